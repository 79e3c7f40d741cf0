#include "vault/clock_watch.h"

#include <fmt/format.h>

#include <cstdlib>
#include <fstream>

#include "common/check.h"
#include "common/json_in.h"
#include "common/units.h"

namespace osr::vault {

using nlohmann::json;

ClockWatch::ClockWatch(int64_t settle_ns) : settle_ns_(settle_ns) {
  OSR_CHECK(settle_ns > 0);
}

void ClockWatch::Anchor(int64_t wall_ns, int64_t mono_ns) {
  anchored_ = true;
  anchor_wall_ns_ = wall_ns;
  anchor_mono_ns_ = mono_ns;
  saved_mono_ns_ = mono_ns;
}

ClockWatch::Change ClockWatch::Observe(int64_t wall_ns, int64_t mono_ns) {
  if (!anchored_) {
    Anchor(wall_ns, mono_ns);
    return Change::kAnchored;
  }
  // Where the wall clock would be had it only moved as the monotonic clock did.
  int64_t offset_ns = wall_ns - (anchor_wall_ns_ + (mono_ns - anchor_mono_ns_));
  if (!hold_) {
    if (std::llabs(offset_ns) > kStepNsMin) {
      hold_ = ClockHold{offset_ns, wall_ns, wall_ns, mono_ns};
      return Change::kStepped;
    }
    // In step: small corrections are taken as they come, and the anchor is saved now
    // and then, so that a restarted vault compares with a recent reading.
    if (mono_ns - saved_mono_ns_ >= kSaveNs) {
      Anchor(wall_ns, mono_ns);
      return Change::kAnchored;
    }
    return Change::kNone;
  }
  if (std::llabs(offset_ns) <= kStepNsMin) {
    // The step was undone: the wall clock agrees with the anchor again.
    hold_.reset();
    Anchor(wall_ns, mono_ns);
    return Change::kReturned;
  }
  int64_t steady_offset_ns = wall_ns - (hold_->steady_wall_ns + (mono_ns - hold_->steady_mono_ns));
  if (std::llabs(steady_offset_ns) > kStepNsMin) {
    // Another step: the hold now names the whole distance from the anchor, and the
    // steady time starts again.
    *hold_ = ClockHold{offset_ns, wall_ns, wall_ns, mono_ns};
    return Change::kStepped;
  }
  if (mono_ns - hold_->steady_mono_ns >= settle_ns_) {
    hold_.reset();
    Anchor(wall_ns, mono_ns);
    return Change::kSettled;
  }
  return Change::kNone;
}

ClockWatch::Change ClockWatch::Confirm(int64_t wall_ns, int64_t mono_ns) {
  hold_.reset();
  Anchor(wall_ns, mono_ns);
  return Change::kConfirmed;
}

int64_t ClockWatch::SettlesAtWallNs() const {
  return hold_ ? hold_->steady_wall_ns + settle_ns_ : 0;
}

std::string ClockWatch::HealthWarning() const {
  if (!hold_) return "";
  return fmt::format(
      "Warning: the vault's clock stepped {} by {} at {}; recovery points are still made, "
      "but none is deleted (retention and thinning are held) until the clock is confirmed "
      "(osr point confirm-clock), it returns to where it was, or it keeps time until {}",
      hold_->step_ns > 0 ? "forward" : "back", FormatDurationNs(std::llabs(hold_->step_ns)),
      FormatTimeNs(hold_->detected_wall_ns), FormatTimeNs(SettlesAtWallNs()));
}

json ClockWatch::StatusJson() const {
  if (!hold_) return json{{"held", false}};
  return json{{"held", true},
              {"step_seconds", static_cast<double>(hold_->step_ns) / 1e9},
              {"stepped_at", FormatTimeNs(hold_->detected_wall_ns)},
              {"settles_at", FormatTimeNs(SettlesAtWallNs())},
              {"message", HealthWarning()}};
}

json ClockWatch::ToJson(const std::string& boot_id) const {
  json out = {{"version", 1},
              {"boot_id", boot_id},
              {"anchor_wall_ns", anchor_wall_ns_},
              {"anchor_mono_ns", anchor_mono_ns_},
              {"hold", nullptr}};
  if (hold_) {
    out["hold"] = {{"step_ns", hold_->step_ns},
                   {"detected_wall_ns", hold_->detected_wall_ns},
                   {"steady_wall_ns", hold_->steady_wall_ns},
                   {"steady_mono_ns", hold_->steady_mono_ns}};
  }
  return out;
}

ClockWatch::Change ClockWatch::Restore(const json& saved, const std::string& boot_id,
                                       int64_t wall_ns, int64_t mono_ns) {
  if (!saved.is_object()) return Change::kNone;
  json_in::Fields f(saved, "clock.");
  int64_t version = f.I64("version", 0);
  std::string saved_boot = f.String("boot_id", "");
  int64_t anchor_wall = f.I64("anchor_wall_ns", 0);
  int64_t anchor_mono = f.I64("anchor_mono_ns", 0);
  const json* h = f.Object("hold");
  std::optional<ClockHold> hold;
  if (h != nullptr) {
    json_in::Fields hf(*h, "clock.hold.");
    hold = ClockHold{hf.I64("step_ns", 0), hf.I64("detected_wall_ns", 0),
                     hf.I64("steady_wall_ns", 0), hf.I64("steady_mono_ns", 0)};
    if (!hf.ok()) return Change::kNone;
  }
  if (!f.ok() || version != 1 || anchor_wall == 0) return Change::kNone;
  if (!boot_id.empty() && saved_boot == boot_id) {
    // Same boot: the monotonic clock went on; the next Observe compares with the anchor.
    Anchor(anchor_wall, anchor_mono);
    hold_ = hold;
    return Change::kNone;
  }
  // Another boot: the saved monotonic readings mean nothing now. A hold stays (its
  // steady time starts again); a wall clock before the last trusted reading is a step
  // back (how much longer the vault was down is unknown, so the step is at least this).
  if (!hold && wall_ns < anchor_wall - kStepNsMin) {
    hold = ClockHold{wall_ns - anchor_wall, wall_ns, 0, 0};
  }
  if (!hold) {
    Anchor(wall_ns, mono_ns);
    return Change::kAnchored;
  }
  hold->steady_wall_ns = wall_ns;
  hold->steady_mono_ns = mono_ns;
  hold_ = hold;
  // The anchor is where the wall clock would be without the step, so that the clock
  // coming back still ends the hold.
  Anchor(wall_ns - hold->step_ns, mono_ns);
  return Change::kStepped;
}

std::string BootId() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (!std::getline(in, id)) return "";
  return id;
}

std::string FormatDurationNs(int64_t ns) {
  int64_t s = (ns + 500000000) / 1000000000;  // to the nearest second
  if (s < 120) return fmt::format("{} s", s);
  if (s < 7200) return fmt::format("{} min {} s", s / 60, s % 60);
  if (s < 2 * 86400) return fmt::format("{} h {} min", s / 3600, (s % 3600) / 60);
  return fmt::format("{} days {} h", s / 86400, (s % 86400) / 3600);
}

}  // namespace osr::vault
