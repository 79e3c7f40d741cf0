#include "hypervisor/allow_list.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include "hypervisor/qemu_args.h"

namespace osr::hypervisor {
namespace {

// The file's text, once it is known to be a file only its owner (root or us) can write.
Result<std::string> ReadTrustedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    Status s = Status::FromErrno(errno, "stat " + path);
    ::close(fd);
    return s;
  }
  std::string why;
  if (!S_ISREG(st.st_mode)) {
    why = "is not a regular file";
  } else if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    why = fmt::format("may be written by its group or others (mode {:o}; chmod go-w)",
                      st.st_mode & 07777);
  } else if (st.st_uid != 0 && st.st_uid != ::geteuid()) {
    why = fmt::format("is owned by uid {}, neither root nor this daemon's user", st.st_uid);
  } else if (static_cast<uint64_t>(st.st_size) > kAllowListBytesMax) {
    why = fmt::format("is larger than {} bytes", kAllowListBytesMax);
  }
  if (!why.empty()) {
    ::close(fd);
    return Status(
        Code::kPermissionDenied,
        fmt::format("{} {}: it says what runs on this host, so it is not used", path, why));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      Status s = Status::FromErrno(errno, "read " + path);
      ::close(fd);
      return s;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  text.resize(done);
  return text;
}

Status ReadEntry(const std::string& path, const AllowListKind& kind, const std::string& name,
                 const toml::node& node, std::string* out) {
  std::string where = fmt::format("{}: [{}.{}]", path, kind.kind, name);
  if (!ValidName(name)) {
    return InvalidArgument(where +
                           ": the name must be 1-64 characters of [A-Za-z0-9._-], not starting "
                           "with . or -");
  }
  const toml::table* t = node.as_table();
  if (t == nullptr) return InvalidArgument(where + " must be a table");
  for (auto&& [k, v] : *t) {
    if (k.str() != kind.key && k.str() != "description") {
      return InvalidArgument(
          fmt::format("{}: '{}' is not a key here ({}, description)", where, k.str(), kind.key));
    }
    if (!v.is_string())
      return InvalidArgument(fmt::format("{}: '{}' must be a string", where, k.str()));
  }
  std::optional<std::string> value = (*t)[kind.key].value<std::string>();
  if (!value || value->empty()) {
    return InvalidArgument(fmt::format("{}: '{}' is missing or empty", where, kind.key));
  }
  if (value->size() > kCommandBytesMax || value->find('\0') != std::string::npos) {
    return InvalidArgument(fmt::format("{}: '{}' is longer than {} bytes or has a NUL", where,
                                       kind.key, kCommandBytesMax));
  }
  *out = std::move(*value);
  return Status::Ok();
}

Status ReadKind(const std::string& path, const AllowListKind& kind, const toml::node& node,
                std::map<std::string, std::string>& entries, size_t& count) {
  const toml::table* t = node.as_table();
  if (t == nullptr)
    return InvalidArgument(fmt::format("{}: '{}' must be a table", path, kind.kind));
  for (auto&& [name, entry] : *t) {
    if (++count > kAllowListEntriesMax) {
      return InvalidArgument(fmt::format("{}: more than {} entries", path, kAllowListEntriesMax));
    }
    std::string value;
    OSR_RETURN_IF_ERROR(ReadEntry(path, kind, std::string(name.str()), entry, &value));
    entries[std::string(name.str())] = std::move(value);
  }
  return Status::Ok();
}

}  // namespace

Result<AllowListEntries> LoadAllowListFile(const std::string& path,
                                           const std::vector<AllowListKind>& kinds) {
  OSR_ASSIGN_OR_RETURN(std::string text, ReadTrustedFile(path));
  toml::table doc;
  try {  // toml++ reports parse errors as exceptions; they stop here
    doc = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    return InvalidArgument(
        fmt::format("{}: {} (line {})", path, e.description(), e.source().begin.line));
  }
  AllowListEntries out;
  for (auto& k : kinds) out[k.kind];
  size_t count = 0;
  for (auto&& [key, node] : doc) {
    std::string k(key.str());
    if (k == "version") {
      if (node.value<int64_t>() != 1 || !node.is_integer()) {
        return InvalidArgument(path + ": 'version' must be 1");
      }
      continue;
    }
    auto kind = std::find_if(kinds.begin(), kinds.end(),
                             [&](const AllowListKind& x) { return x.kind == k; });
    if (kind == kinds.end()) {
      std::string known = "version";
      for (auto& x : kinds) known += ", " + x.kind;
      return InvalidArgument(
          fmt::format("{}: '{}' is not a key of this file ({})", path, k, known));
    }
    OSR_RETURN_IF_ERROR(ReadKind(path, *kind, node, out[k], count));
  }
  return out;
}

CommandPolicy SiteCommands::Policy() const {
  CommandPolicy p;
  p.allow_literal = allow_api_commands;
  for (auto& [name, unused] : commands) p.commands.insert(name);
  for (auto& [name, unused] : qemu_args) p.qemu_args.insert(name);
  return p;
}

Result<std::string> SiteCommands::ProcessCommand(const VmSpec& spec) const {
  return ResolveCommand(spec.command, commands, allow_api_commands, ProcessCommandFields(),
                        kSiteRules);
}

Result<std::string> SiteCommands::QemuArgs(const VmSpec& spec) const {
  if (spec.qemu_args.empty()) return std::string();
  OSR_ASSIGN_OR_RETURN(
      std::string args,
      ResolveCommand(spec.qemu_args, qemu_args, allow_api_commands, QemuArgsFields(), kSiteRules));
  if (Status st = CheckQemuArgsText(args); !st.ok()) {
    return InvalidArgument(fmt::format(
        "{}: {}", spec.qemu_args.name.empty() ? "spec.qemu_args" : "spec.qemu_args_name",
        st.message()));
  }
  return args;
}

Result<SiteCommands> LoadSiteCommands(const std::string& path, bool allow_api_commands) {
  SiteCommands c;
  c.file = path;
  c.allow_api_commands = allow_api_commands;
  if (path.empty()) return c;
  OSR_ASSIGN_OR_RETURN(AllowListEntries entries,
                       LoadAllowListFile(path, {{"commands", "command"}, {"qemu_args", "args"}}));
  c.commands = std::move(entries["commands"]);
  c.qemu_args = std::move(entries["qemu_args"]);
  for (auto& [name, args] : c.qemu_args) {
    if (Status st = CheckQemuArgsText(args); !st.ok()) {
      return InvalidArgument(fmt::format("{}: [qemu_args.{}]: {}", path, name, st.message()));
    }
  }
  return c;
}

}  // namespace osr::hypervisor
