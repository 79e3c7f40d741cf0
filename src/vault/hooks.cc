#include "vault/hooks.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "hypervisor/allow_list.h"
#include "hypervisor/child.h"

namespace osr::vault {

Result<HookConfig> LoadHookConfig(const std::string& path, bool allow_api_hooks) {
  HookConfig c;
  c.file = path;
  c.allow_api_hooks = allow_api_hooks;
  if (path.empty()) return c;
  OSR_ASSIGN_OR_RETURN(hypervisor::AllowListEntries entries,
                       hypervisor::LoadAllowListFile(path, {{"hooks", "command"}}));
  c.hooks = std::move(entries["hooks"]);
  return c;
}

Result<std::string> HookCommand(const HookConfig& cfg, const hypervisor::VmSpec& spec,
                                const std::string& hook) {
  auto it = spec.hooks.find(hook);
  if (it == spec.hooks.end()) return std::string();
  return hypervisor::ResolveCommand(it->second, cfg.hooks, cfg.allow_api_hooks,
                                    hypervisor::HookFields(hook), kVaultRules);
}

Status CheckHooks(const HookConfig& cfg, const hypervisor::VmSpec& spec) {
  for (auto& [hook, unused] : spec.hooks)
    OSR_RETURN_IF_ERROR(HookCommand(cfg, spec, hook).status());
  return Status::Ok();
}

Status RunHookCommand(const std::string& vm, const std::string& hook, const std::string& command,
                      const std::vector<std::string>& env, uint64_t timeout_ms) {
  // Everything the child needs is prepared before fork (no allocation after it).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
  env_strings.insert(env_strings.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) return Status::FromErrno(errno, "fork for hook " + hook);
  if (pid == 0) {
    // The drivers' child setup: its own process group (a timeout kills the whole hook),
    // stdin from /dev/null, none of the vault's descriptors (catalog, sockets, keys), no
    // signal blocked; stdout and stderr stay the vault's (its log).
    hypervisor::PrepareVmChild(/*log_fd=*/-1);
    ::execle("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr), envp.data());
    ::_exit(127);
  }
  ::setpgid(pid, pid);  // also here: no race with the child's own call
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) return Status::FromErrno(errno, "wait for hook " + hook);
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(-pid, SIGKILL);
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return Unavailable(
          fmt::format("hook {} of VM {} did not finish in {} ms (killed)", hook, vm, timeout_ms));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Internal(fmt::format("hook {} of VM {} failed (exit status {})", hook, vm,
                                WIFEXITED(status) ? WEXITSTATUS(status) : -1));
  }
  return Status::Ok();
}

}  // namespace osr::vault
