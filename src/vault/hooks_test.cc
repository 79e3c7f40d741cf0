#include "vault/hooks.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>

namespace osr::vault {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string TempPath(const std::string& name) {
  return fs::temp_directory_path() / ("osr-hooks-" + std::to_string(::getpid()) + "-" + name);
}

hypervisor::VmSpec Spec(const json& hooks) {
  auto s = hypervisor::ParseVmSpec(json{{"hooks", hooks}}, hypervisor::SpecSource::kNew);
  EXPECT_TRUE(s.ok()) << s.status().message();
  return s.ok() ? *s : hypervisor::VmSpec{};
}

TEST(Hooks, AStrictVaultRunsOnlyEntriesOfItsHooksFile) {
  std::string path = TempPath("hooks.toml");
  std::ofstream(path) << "[hooks.db-freeze]\ncommand = \"fsfreeze -f /srv/db\"\n";
  ::chmod(path.c_str(), 0600);
  auto strict = LoadHookConfig(path, false);
  ASSERT_TRUE(strict.ok()) << strict.status().message();
  fs::remove(path);

  auto named = Spec({{"freeze", {{"name", "db-freeze"}}}});
  EXPECT_TRUE(CheckHooks(*strict, named).ok());
  EXPECT_EQ(HookCommand(*strict, named, "freeze").value(), "fsfreeze -f /srv/db");
  EXPECT_EQ(HookCommand(*strict, named, "thaw").value(), "");  // none

  auto literal = Spec({{"freeze", {{"command", "touch /tmp/x"}}}});
  Status st = CheckHooks(*strict, literal);
  EXPECT_EQ(st.code(), Code::kInvalidArgument);
  EXPECT_EQ(st.message().rfind("spec.hooks.freeze.command:", 0), 0u) << st.message();
  EXPECT_NE(st.message().find("--allow-api-hooks"), std::string::npos) << st.message();
  // A spec stored before allow-lists (a bare string) is a literal too.
  auto old = Spec({{"thaw", "touch /tmp/x"}});
  EXPECT_FALSE(HookCommand(*strict, old, "thaw").ok());

  auto unknown = Spec({{"freeze", {{"name", "other"}}}});
  st = CheckHooks(*strict, unknown);
  EXPECT_EQ(st.message().rfind("spec.hooks.freeze.name:", 0), 0u) << st.message();

  HookConfig lab = *strict;
  lab.allow_api_hooks = true;
  EXPECT_EQ(HookCommand(lab, literal, "freeze").value(), "touch /tmp/x");
  EXPECT_EQ(HookCommand(lab, old, "thaw").value(), "touch /tmp/x");
}

TEST(Hooks, RunHookCommandReportsExitStatusTimeoutAndPassesTheEnvironment) {
  std::string out = TempPath("env");
  fs::remove(out);
  ASSERT_TRUE(RunHookCommand("vm1", "freeze", "echo \"$OSR_VM $OSR_SITE\" > " + out,
                             {"OSR_VM=vm1", "OSR_SITE=recovery"}, 5000)
                  .ok());
  std::string text;
  std::getline(std::ifstream(out), text);
  EXPECT_EQ(text, "vm1 recovery");
  fs::remove(out);

  Status st = RunHookCommand("vm1", "thaw", "exit 3", {}, 5000);
  EXPECT_EQ(st.code(), Code::kInternal);
  EXPECT_NE(st.message().find("exit status 3"), std::string::npos) << st.message();

  auto t0 = std::chrono::steady_clock::now();
  st = RunHookCommand("vm1", "pre_failover", "sleep 30", {}, 200);
  EXPECT_EQ(st.code(), Code::kUnavailable);
  EXPECT_NE(st.message().find("did not finish in 200 ms"), std::string::npos) << st.message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

}  // namespace
}  // namespace osr::vault
