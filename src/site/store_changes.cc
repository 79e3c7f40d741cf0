#include "site/store_changes.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <random>

#include "common/check.h"

namespace osr::site {

namespace {

constexpr size_t kInstanceHexDigits = 16;

bool IsLowerHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

}  // namespace

StoreChangeLog::StoreChangeLog(std::string instance) : instance_(std::move(instance)) {
  OSR_CHECK(instance_.size() == kInstanceHexDigits &&
            std::all_of(instance_.begin(), instance_.end(), IsLowerHex));
}

std::string StoreChangeLog::RandomInstance() {
  std::random_device rd;
  uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  return fmt::format("{:016x}", v);
}

Result<StoreChangeLog::Answer> StoreChangeLog::Note(
    const std::string& since, const std::map<std::string, std::string>& marks) {
  // Parse `since` first: a bad one changes nothing.
  bool from_start = since == "0";
  std::string since_instance;
  uint64_t since_generation = 0;
  if (!from_start) {
    auto bad = [&] {
      return InvalidArgument(
          "since: \"0\" or a generation as a site answered it (16 hex digits, '-', a number)");
    };
    if (since.size() > kGenerationBytesMax || since.size() < kInstanceHexDigits + 2 ||
        since[kInstanceHexDigits] != '-') {
      return bad();
    }
    since_instance = since.substr(0, kInstanceHexDigits);
    if (!std::all_of(since_instance.begin(), since_instance.end(), IsLowerHex)) return bad();
    const char* first = since.data() + kInstanceHexDigits + 1;
    const char* last = since.data() + since.size();
    auto [end, ec] = std::from_chars(first, last, since_generation);
    if (ec != std::errc() || end != last) return bad();
  }

  std::lock_guard lock(mu_);
  uint64_t now = generation_ + 1;  // given to whatever changed in this call
  bool changed_any = false;
  for (const auto& [name, text] : marks) {
    auto it = marks_.find(name);
    if (it != marks_.end() && it->second.text == text) continue;
    marks_[name] = Mark{text, now};
    removed_.erase(name);
    changed_any = true;
  }
  for (auto it = marks_.begin(); it != marks_.end();) {
    if (marks.count(it->first)) {
      ++it;
      continue;
    }
    removed_[it->first] = now;
    it = marks_.erase(it);
    changed_any = true;
  }
  while (removed_.size() > kRemovedMax) {
    // Forget the oldest removal; a `since` from before it can no longer be answered in part.
    auto oldest =
        std::min_element(removed_.begin(), removed_.end(),
                         [](const auto& a, const auto& b) { return a.second < b.second; });
    forgotten_through_ = std::max(forgotten_through_, oldest->second);
    removed_.erase(oldest);
  }
  if (changed_any) generation_ = now;

  Answer out;
  out.generation = fmt::format("{}-{}", instance_, generation_);
  out.full = from_start || since_instance != instance_ || since_generation > generation_ ||
             since_generation < forgotten_through_;
  for (const auto& [name, mark] : marks_) {
    if (out.full || mark.generation > since_generation) out.changed.push_back(name);
  }
  if (!out.full) {
    for (const auto& [name, generation] : removed_) {
      if (generation > since_generation) out.removed.push_back(name);
    }
  }
  return out;
}

}  // namespace osr::site
