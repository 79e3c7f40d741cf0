// The qemu arguments a VM spec may add to the command line osr builds: deny by default.
//
// osr starts qemu as the site daemon's user (root on a real site), so an extra argument
// is host access: `-monitor tcp:...` or `-qmp` give a shell-like console, `-chardev` /
// `-serial` / `-netdev user,hostfwd=` open sockets, `-drive file=` / `-blockdev` / a bare
// file name / `-initrd /etc/shadow` give the guest a host file, `-plugin` loads a
// library, `-D` / `-pidfile` write files. CheckQemuArgs accepts only the options of one
// table (kAllowedQemuOptions, documented in docs/api.md, "Extra qemu arguments"), each
// with a rule for its value, and refuses every other word. It is applied to every extra
// argument whatever its source (the site's allow-list file or, on a lab site, the API),
// when the site loads its allow-list, when the vault creates a VM, and by the qemu driver
// right before it starts qemu.
//
// Thread model: none (pure functions).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace osr::hypervisor {

// Splits qemu arguments on whitespace; '...' or "..." keep spaces inside a word
// (-append "console=ttyS0 quiet"). No escapes. kInvalidArgument on an open quote (the
// message gives its position, not the text).
Result<std::vector<std::string>> SplitArgs(std::string_view text);

// The limit of one value (an -append command line, a path).
inline constexpr size_t kQemuArgBytesMax = 4096;
// The limit of the whole extra-argument text.
inline constexpr size_t kQemuArgsBytesMax = 16384;

// Ok when every word of `args` (as SplitArgs gives them) is an allowed option followed
// by a value its rule accepts. kInvalidArgument otherwise, naming the first refused word
// and why; the message never repeats the other arguments (they may hold secrets, e.g. a
// kernel command line).
Status CheckQemuArgs(const std::vector<std::string>& args);

// SplitArgs, then CheckQemuArgs; also refuses a text longer than kQemuArgsBytesMax.
Status CheckQemuArgsText(std::string_view text);

// The allowed options, for messages and docs: "-kernel, -initrd, ...".
std::string AllowedQemuOptions();

}  // namespace osr::hypervisor
