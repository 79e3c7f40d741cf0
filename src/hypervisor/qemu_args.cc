#include "hypervisor/qemu_args.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>

namespace osr::hypervisor {
namespace {

// How an option's value is checked.
enum class ValueRule {
  kNone,    // a flag: no value
  kPath,    // an absolute path of a regular file (no comma, no "..", not /dev, /proc, /sys)
  kText,    // printable text (a kernel command line)
  kChoice,  // one of `choices`
  kWords,   // comma-separated words of [A-Za-z0-9_.+=-] (a CPU model and its flags)
  kList,    // a qemu option list: KEY=WORD,... with KEY from `choices`; the first element
            // may be a bare WORD, read as key `implied` (checked against `implied_choices`)
};

struct OptionRule {
  std::string_view name;
  ValueRule rule;
  std::vector<std::string_view> choices = {};
  std::string_view implied = {};
  std::vector<std::string_view> implied_choices = {};
};

// The whole list of what extra qemu arguments may say. docs/api.md ("Extra qemu
// arguments") documents it; a change here changes that page.
const std::vector<OptionRule> kAllowed = {
    OptionRule{"-kernel", ValueRule::kPath},
    OptionRule{"-initrd", ValueRule::kPath},
    OptionRule{"-append", ValueRule::kText},
    OptionRule{"-no-reboot", ValueRule::kNone},
    OptionRule{"-nographic", ValueRule::kNone},
    OptionRule{"-display", ValueRule::kChoice, {"none"}},
    OptionRule{"-vga", ValueRule::kChoice, {"none", "std", "virtio"}},
    OptionRule{"-cpu", ValueRule::kWords},
    OptionRule{"-machine",
               ValueRule::kList,
               {"type", "usb", "graphics", "vmport", "smm", "hpet", "pit", "pic", "kernel-irqchip",
                "kernel_irqchip", "i8042", "sata", "acpi", "mem-merge", "dump-guest-core",
                "suppress-vmdesc"},
               "type"},
    OptionRule{"-rtc", ValueRule::kList, {"base", "clock", "driftfix"}},
    OptionRule{
        "-boot", ValueRule::kList, {"order", "once", "menu", "reboot-timeout", "strict"}, "order"},
    OptionRule{"-watchdog-action",
               ValueRule::kChoice,
               {"reset", "shutdown", "poweroff", "pause", "debug", "none", "inject-nmi"}},
    OptionRule{"-device",
               ValueRule::kList,
               {"driver", "id", "bus", "addr"},
               "driver",
               {"virtio-rng-pci", "virtio-balloon-pci", "i6300esb", "pvpanic"}},
    OptionRule{"-sandbox",
               ValueRule::kList,
               {"enable", "obsolete", "elevateprivileges", "spawn", "resourcecontrol"},
               "enable",
               {"on", "off"}},
    OptionRule{"-msg", ValueRule::kList, {"timestamp", "guest-name"}},
};

// Options that have a spec field instead: the refusal says which.
struct Redirect {
  std::string_view name;
  std::string_view use;
};
constexpr std::array kRedirects = {
    Redirect{"-m", "spec.memory_bytes"},
    Redirect{"-smp", "spec.cpus"},
    Redirect{"-accel", "spec.accel"},
    Redirect{"-enable-kvm", "spec.accel"},
    Redirect{"-name", "nothing (osr names the VM)"},
};

bool Contains(const std::vector<std::string_view>& set, std::string_view s) {
  return std::find(set.begin(), set.end(), s) != set.end();
}

std::string Join(const std::vector<std::string_view>& set) {
  std::string out;
  for (auto s : set) out += (out.empty() ? "" : ", ") + std::string(s);
  return out;
}

bool IsWordChar(char c, std::string_view extra) {
  return std::isalnum(static_cast<unsigned char>(c)) || extra.find(c) != std::string_view::npos;
}

bool IsWord(std::string_view s, std::string_view extra = "_.:+-") {
  return !s.empty() && s.size() <= 256 &&
         std::all_of(s.begin(), s.end(), [&](char c) { return IsWordChar(c, extra); });
}

bool Printable(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u >= 0x20 && u != 0x7f;
  });
}

// A word of the user's shown in a message: only when it is short and plain.
std::string Shown(std::string_view word) {
  if (IsWord(word, "_.:+-=,/") && word.size() <= 64) return fmt::format("'{}'", word);
  return "(a word that is not shown)";
}

Status CheckPath(std::string_view opt, std::string_view v) {
  if (v.empty() || v.front() != '/')
    return InvalidArgument(fmt::format("{}: not an absolute path", opt));
  if (v.size() > kQemuArgBytesMax || !Printable(v) || v.find(',') != std::string_view::npos) {
    return InvalidArgument(
        fmt::format("{}: the path has a comma, a control character or is too long", opt));
  }
  for (std::string_view bad : {"/../", "/./"}) {
    if (v.find(bad) != std::string_view::npos) {
      return InvalidArgument(fmt::format("{}: the path has a '..' or '.' component", opt));
    }
  }
  if (v.ends_with("/..") || v.ends_with("/.")) {
    return InvalidArgument(fmt::format("{}: the path has a '..' or '.' component", opt));
  }
  for (std::string_view dir : {"/dev/", "/proc/", "/sys/"}) {
    if (v.starts_with(dir)) {
      return InvalidArgument(fmt::format("{}: paths under {} are not allowed", opt, dir));
    }
  }
  return Status::Ok();
}

Status CheckList(const OptionRule& r, std::string_view v) {
  size_t start = 0;
  for (size_t i = 0; start <= v.size(); ++i) {
    size_t comma = v.find(',', start);
    std::string_view elem =
        v.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
    start = comma == std::string_view::npos ? v.size() + 1 : comma + 1;
    if (elem.empty()) return InvalidArgument(fmt::format("{}: an empty element (or ',,')", r.name));
    size_t eq = elem.find('=');
    std::string_view key = eq == std::string_view::npos ? std::string_view() : elem.substr(0, eq);
    std::string_view value = eq == std::string_view::npos ? elem : elem.substr(eq + 1);
    if (eq == std::string_view::npos) {
      if (i != 0 || r.implied.empty()) {
        return InvalidArgument(fmt::format("{}: {} is not KEY=VALUE (keys: {})", r.name,
                                           Shown(elem), Join(r.choices)));
      }
      key = r.implied;
    }
    if (!Contains(r.choices, key)) {
      return InvalidArgument(fmt::format("{}: key {} is not allowed (allowed: {})", r.name,
                                         Shown(key), Join(r.choices)));
    }
    if (!IsWord(value)) {
      return InvalidArgument(
          fmt::format("{}: the value of {} must be a word of [A-Za-z0-9_.:+-]", r.name, key));
    }
    if (key == r.implied && r.implied_choices.size() != 0 && !Contains(r.implied_choices, value)) {
      return InvalidArgument(fmt::format("{}: {} {} is not allowed (allowed: {})", r.name, key,
                                         Shown(value), Join(r.implied_choices)));
    }
  }
  return Status::Ok();
}

Status CheckValue(const OptionRule& r, std::string_view v) {
  switch (r.rule) {
    case ValueRule::kNone:
      return Status::Ok();
    case ValueRule::kPath:
      return CheckPath(r.name, v);
    case ValueRule::kText:
      if (v.size() > kQemuArgBytesMax || !Printable(v)) {
        return InvalidArgument(
            fmt::format("{}: the text has a control character or is longer than {} bytes", r.name,
                        kQemuArgBytesMax));
      }
      return Status::Ok();
    case ValueRule::kChoice:
      if (!Contains(r.choices, v)) {
        return InvalidArgument(
            fmt::format("{}: {} is not allowed (allowed: {})", r.name, Shown(v), Join(r.choices)));
      }
      return Status::Ok();
    case ValueRule::kWords: {
      size_t start = 0;
      while (start <= v.size()) {
        size_t comma = v.find(',', start);
        std::string_view elem = v.substr(
            start, comma == std::string_view::npos ? std::string_view::npos : comma - start);
        if (!IsWord(elem, "_.+=-")) {
          return InvalidArgument(fmt::format(
              "{}: each comma-separated element must be a word of [A-Za-z0-9_.+=-]", r.name));
        }
        start = comma == std::string_view::npos ? v.size() + 1 : comma + 1;
      }
      return Status::Ok();
    }
    case ValueRule::kList:
      return CheckList(r, v);
  }
  return Internal("unknown value rule");
}

}  // namespace

Result<std::vector<std::string>> SplitArgs(std::string_view text) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  char quote = 0;
  size_t quote_at = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    if (quote != 0) {
      if (c == quote) {
        quote = 0;
      } else {
        word += c;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
      quote_at = i;
      in_word = true;
    } else if (std::isspace(static_cast<unsigned char>(c))) {
      if (in_word) words.push_back(std::move(word));
      word.clear();
      in_word = false;
    } else {
      word += c;
      in_word = true;
    }
  }
  if (quote != 0) {
    return InvalidArgument(fmt::format("the quote {} at byte {} is not closed", quote, quote_at));
  }
  if (in_word) words.push_back(std::move(word));
  return words;
}

Status CheckQemuArgs(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    std::string_view word = args[i];
    if (word.empty() || word.front() != '-') {
      return InvalidArgument(fmt::format(
          "argument {} is not an option (qemu opens a bare word as a disk image)", i + 1));
    }
    // qemu takes --opt as -opt.
    std::string_view opt = word.starts_with("--") ? word.substr(1) : word;
    if (opt == "-M") opt = "-machine";
    for (auto& r : kRedirects) {
      if (opt == r.name) {
        return InvalidArgument(fmt::format("{} is not allowed here: use {}", r.name, r.use));
      }
    }
    auto rule = std::find_if(kAllowed.begin(), kAllowed.end(),
                             [&](const OptionRule& r) { return r.name == opt; });
    if (rule == kAllowed.end()) {
      return InvalidArgument(fmt::format("{} is not an allowed qemu option (allowed: {})",
                                         Shown(word), AllowedQemuOptions()));
    }
    if (rule->rule == ValueRule::kNone) continue;
    if (i + 1 == args.size()) return InvalidArgument(fmt::format("{} needs a value", rule->name));
    OSR_RETURN_IF_ERROR(CheckValue(*rule, args[++i]));
  }
  return Status::Ok();
}

Status CheckQemuArgsText(std::string_view text) {
  if (text.size() > kQemuArgsBytesMax) {
    return InvalidArgument(
        fmt::format("{} bytes, more than the {} allowed", text.size(), kQemuArgsBytesMax));
  }
  OSR_ASSIGN_OR_RETURN(std::vector<std::string> words, SplitArgs(text));
  return CheckQemuArgs(words);
}

std::string AllowedQemuOptions() {
  std::string out;
  for (auto& r : kAllowed) out += (out.empty() ? "" : ", ") + std::string(r.name);
  return out;
}

}  // namespace osr::hypervisor
