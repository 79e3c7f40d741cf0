#include "common/file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <linux/falloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <shared_mutex>
#include <vector>

namespace osr {

namespace {

// The test-only hooks: a FileFault (SetFileFaultForTest) and a power-loss recorder
// (StartPowerLossRecorderForTest). test_hooks is read without a lock on every call: 0 in
// production, so no lock is ever taken there.
constexpr uint32_t kHookFault = 1;
constexpr uint32_t kHookPowerLoss = 2;
std::atomic<uint32_t> test_hooks{0};

std::mutex fault_mu;
FileFault fault;  // guarded by fault_mu

// How many of `bytes` to `path` may be written before the fault's error (all of them:
// no fault applies). Sets *err when the write must fail after those.
size_t FaultAllows(const std::string& path, size_t bytes, int* err) {
  if (!(test_hooks.load(std::memory_order_relaxed) & kHookFault)) return bytes;
  std::lock_guard lock(fault_mu);
  if (fault.path_part.empty() || path.find(fault.path_part) == std::string::npos) return bytes;
  if (bytes <= fault.write_bytes_left) {
    fault.write_bytes_left -= bytes;
    return bytes;
  }
  size_t allowed = static_cast<size_t>(fault.write_bytes_left);
  fault.write_bytes_left = 0;
  *err = fault.err;
  return allowed;
}

// The free bytes an ENOSPC fault leaves on the file system of `path` (file.h), if any.
std::optional<uint64_t> FaultSpaceLeft(const std::string& path) {
  if (!(test_hooks.load(std::memory_order_relaxed) & kHookFault)) return std::nullopt;
  std::lock_guard lock(fault_mu);
  if (fault.err != ENOSPC || fault.path_part.empty()) return std::nullopt;
  if (path.find(fault.path_part) == std::string::npos && !fault.path_part.starts_with(path)) {
    return std::nullopt;
  }
  return fault.write_bytes_left;
}

// The fault's errno for a sync of `path`, or 0.
int FaultOnSync(const std::string& path) {
  if (!(test_hooks.load(std::memory_order_relaxed) & kHookFault)) return 0;
  std::lock_guard lock(fault_mu);
  if (!fault.fail_sync || path.find(fault.path_part) == std::string::npos) return 0;
  return fault.err;
}

// The power-loss model (file.h). A Node is an inode under the root: a file's content as of
// its last sync, or a directory's entries as of its last SyncDir. Nodes are found by
// (device, inode) while they exist; a durable entry keeps its node after the file goes.
struct PowerLossNode {
  bool dir = false;
  std::shared_ptr<const std::string> content;                     // file: null until synced (empty)
  std::map<std::string, std::shared_ptr<PowerLossNode>> entries;  // dir
};
using InodeKey = std::pair<uint64_t, uint64_t>;  // st_dev, st_ino

struct PowerLossRecorder {
  PowerLossOptions options;  // root and excluded lexically normal
  uint64_t points = 0;
  std::shared_ptr<PowerLossNode> root;
  std::map<InodeKey, std::shared_ptr<PowerLossNode>> live;
};
std::mutex power_mu;
std::unique_ptr<PowerLossRecorder> recorder;  // guarded by power_mu

bool PowerLossOn() {
  return test_hooks.load(std::memory_order_relaxed) & kHookPowerLoss;
}

std::string Normal(const std::string& path) {
  std::string n = std::filesystem::path(path).lexically_normal().string();
  while (n.size() > 1 && n.back() == '/') n.pop_back();
  return n;
}

// Whether `path` lies in the modelled part of the recorder's tree. Holds power_mu.
bool ModelledLocked(const std::string& path) {
  if (!recorder) return false;
  const std::string n = Normal(path);
  const std::string& root = recorder->options.root;
  if (n != root && n.compare(0, root.size() + 1, root + "/") != 0) return false;
  for (const std::string& ex : recorder->options.excluded) {
    if (n == ex || n.compare(0, ex.size() + 1, ex + "/") == 0) return false;
  }
  return true;
}

std::optional<InodeKey> KeyOf(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::nullopt;
  return InodeKey{st.st_dev, st.st_ino};
}

std::optional<std::pair<InodeKey, bool>> KeyOfPath(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return std::nullopt;
  return std::pair{InodeKey{st.st_dev, st.st_ino}, S_ISDIR(st.st_mode)};
}

// The node of an inode, made (never synced) when the model does not know it yet. Holds
// power_mu.
std::shared_ptr<PowerLossNode>& NodeLocked(const InodeKey& key, bool dir) {
  auto& node = recorder->live[key];
  if (!node) {
    node = std::make_shared<PowerLossNode>();
    node->dir = dir;
  }
  return node;
}

// The whole content of the open file `fd` (through a second, buffered descriptor: `fd` may
// be O_DIRECT).
std::shared_ptr<const std::string> ReadAll(int fd) {
  auto text = std::make_shared<std::string>();
  int rfd = ::open(fmt::format("/proc/self/fd/{}", fd).c_str(), O_RDONLY | O_CLOEXEC);
  if (rfd < 0) return text;
  Fd owner(rfd);
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(rfd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text->append(buf, static_cast<size_t>(n));
  }
  return text;
}

// A sync point: numbered, and the test's callback called (outside power_mu).
void PowerLossSyncPoint(const std::string& path) {
  if (!PowerLossOn()) return;
  uint64_t k;
  std::function<void(uint64_t, const std::string&)> cb;
  {
    std::lock_guard lock(power_mu);
    if (!ModelledLocked(path)) return;
    k = ++recorder->points;
    cb = recorder->options.on_sync_point;
  }
  if (cb) cb(k, path);
}

// Writes under a recorder wait while an image reads the files as they are now
// (WritePowerLossImageForTest with writeback); they hold this shared.
std::shared_mutex power_write_mu;

std::shared_lock<std::shared_mutex> HoldWrites() {
  if (!PowerLossOn()) return {};
  return std::shared_lock(power_write_mu);
}

// After a file's sync: its content is durable.
void PowerLossFileSynced(const std::string& path, int fd) {
  if (!PowerLossOn()) return;
  auto key = KeyOf(fd);
  if (!key) return;
  auto content = ReadAll(fd);
  std::lock_guard lock(power_mu);
  if (!ModelledLocked(path)) return;
  NodeLocked(*key, false)->content = std::move(content);
}

// After a directory's sync: its entries are durable (pointing at their inodes' nodes).
void PowerLossDirSynced(const std::string& dir) {
  if (!PowerLossOn()) return;
  std::lock_guard lock(power_mu);
  if (!ModelledLocked(dir)) return;
  auto key = KeyOfPath(dir);
  if (!key) return;
  std::map<std::string, std::shared_ptr<PowerLossNode>> entries;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    auto k = KeyOfPath(e.path().string());
    if (k) entries[e.path().filename().string()] = NodeLocked(k->first, k->second);
  }
  NodeLocked(key->first, true)->entries = std::move(entries);
}

// A file or directory just made at `path`: a new inode, never synced (its number may be a
// removed file's).
void PowerLossCreated(const std::string& path) {
  if (!PowerLossOn()) return;
  std::lock_guard lock(power_mu);
  if (!ModelledLocked(path)) return;
  auto key = KeyOfPath(path);
  if (!key) return;
  auto node = std::make_shared<PowerLossNode>();
  node->dir = key->second;
  recorder->live[key->first] = std::move(node);
}

// `path` and what lies under it are about to be unlinked: their inode numbers may be reused.
void PowerLossUnlinking(const std::string& path) {
  if (!PowerLossOn()) return;
  std::lock_guard lock(power_mu);
  if (!ModelledLocked(path)) return;
  if (auto key = KeyOfPath(path)) recorder->live.erase(key->first);
  std::error_code ec;
  for (std::filesystem::recursive_directory_iterator it(path, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (auto key = KeyOfPath(it->path().string())) recorder->live.erase(key->first);
  }
}

// Reads the tree under `dir` as it is now into `node` (the recorder's start: all durable).
void PowerLossAdopt(const std::string& dir, PowerLossNode* node) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string path = e.path().string();
    if (!ModelledLocked(path)) continue;
    auto key = KeyOfPath(path);
    if (!key) continue;
    auto& child = NodeLocked(key->first, key->second);
    if (key->second) {
      PowerLossAdopt(path, child.get());
    } else if (int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); fd >= 0) {
      Fd owner(fd);
      child->content = ReadAll(fd);
    }
    node->entries[e.path().filename().string()] = child;
  }
}

}  // namespace

void SetFileFaultForTest(FileFault f) {
  std::lock_guard lock(fault_mu);
  fault = std::move(f);
  test_hooks.fetch_or(kHookFault);
}

void ClearFileFaultForTest() {
  std::lock_guard lock(fault_mu);
  test_hooks.fetch_and(~kHookFault);
  fault = FileFault{};
}

void StartPowerLossRecorderForTest(PowerLossOptions options) {
  std::lock_guard lock(power_mu);
  options.root = Normal(options.root);
  for (auto& ex : options.excluded) ex = Normal(options.root + "/" + ex);
  recorder = std::make_unique<PowerLossRecorder>();
  recorder->options = std::move(options);
  auto key = KeyOfPath(recorder->options.root);
  recorder->root = std::make_shared<PowerLossNode>();
  recorder->root->dir = true;
  if (key) recorder->live[key->first] = recorder->root;
  PowerLossAdopt(recorder->options.root, recorder->root.get());
  test_hooks.fetch_or(kHookPowerLoss);
}

void StopPowerLossRecorderForTest() {
  std::lock_guard lock(power_mu);
  test_hooks.fetch_and(~kHookPowerLoss);
  recorder.reset();
}

uint64_t PowerLossSyncPointsForTest() {
  std::lock_guard lock(power_mu);
  return recorder ? recorder->points : 0;
}

namespace {

// Writeback (WritePowerLossImageForTest): `synced` with each kWritebackBlockBytes block of
// `now` that differs from it taken or not by a coin; the size grows to the end of the last
// block taken past it, or is now's when it shrank and a coin says the truncation arrived.
std::shared_ptr<const std::string> MixWriteback(const std::string& synced, const std::string& now,
                                                std::mt19937_64& rng) {
  constexpr size_t kWritebackBlockBytes = 4096;
  std::string out = synced;
  size_t end = synced.size();
  for (size_t at = 0; at < now.size(); at += kWritebackBlockBytes) {
    size_t n = std::min(kWritebackBlockBytes, now.size() - at);
    bool differs = at + n > synced.size() || synced.compare(at, n, now, at, n) != 0;
    if (!differs || rng() % 2 == 0) continue;
    if (out.size() < at + n) out.resize(at + n, '\0');
    out.replace(at, n, now, at, n);
    end = std::max(end, at + n);
  }
  if (now.size() < synced.size() && rng() % 2 == 0) end = now.size();
  out.resize(end);
  return std::make_shared<const std::string>(std::move(out));
}

}  // namespace

Status WritePowerLossImageForTest(
    const std::string& to, uint64_t writeback_seed,
    const std::function<bool(const std::string& path)>& writeback_if) {
  // A copy of the durable tree, taken under the lock (contents are shared, immutable);
  // written out without it (the writes pass through the seam). With writeback, writers
  // wait while the files are read as they are now.
  std::unique_lock<std::shared_mutex> writes_wait;
  if (writeback_seed != 0) writes_wait = std::unique_lock(power_write_mu);
  std::mt19937_64 rng(writeback_seed);
  struct Item {
    std::string path;  // relative
    bool dir;
    std::shared_ptr<const std::string> content;
  };
  std::vector<Item> items;
  {
    std::lock_guard lock(power_mu);
    if (!recorder) return Status(Code::kFailedPrecondition, "no power-loss recorder is on");
    const std::string& root = recorder->options.root;
    std::function<void(const PowerLossNode&, const std::string&)> walk =
        [&](const PowerLossNode& node, const std::string& rel) {
          for (const auto& [name, child] : node.entries) {
            std::string path = rel + "/" + name;
            if (!ModelledLocked(root + path)) continue;
            items.push_back({path, child->dir, child->content});
            if (child->dir) walk(*child, path);
            if (child->dir || writeback_seed == 0) continue;
            if (writeback_if && !writeback_if(path)) continue;
            // The file as it is now, when its durable name still names its inode.
            auto key = KeyOfPath(root + path);
            auto live = key ? recorder->live.find(key->first) : recorder->live.end();
            if (live == recorder->live.end() || live->second != child) continue;
            int fd = ::open((root + path).c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            Fd owner(fd);
            auto now = ReadAll(fd);
            static const std::string kEmpty;
            items.back().content =
                MixWriteback(child->content ? *child->content : kEmpty, *now, rng);
          }
        };
    walk(*recorder->root, "");
  }
  if (writes_wait.owns_lock()) writes_wait.unlock();  // the image's own writes go on
  std::error_code ec;
  if (!std::filesystem::create_directory(to, ec)) {
    return Status::FromErrno(ec ? ec.value() : EEXIST, "create image " + to);
  }
  for (const Item& item : items) {
    const std::string path = to + item.path;
    if (item.dir) {
      std::filesystem::create_directory(path, ec);
      if (ec) return Status::FromErrno(ec.value(), "create " + path);
      continue;
    }
    OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kCreateExclusive));
    if (item.content && !item.content->empty()) {
      OSR_RETURN_IF_ERROR(f.PWrite(
          0, {reinterpret_cast<const uint8_t*>(item.content->data()), item.content->size()}));
    }
  }
  return Status::Ok();
}

Result<SpaceInfo> FileSystemSpace(const std::string& path) {
  struct statvfs v {};
  if (::statvfs(path.c_str(), &v) != 0) return Status::FromErrno(errno, "statvfs " + path);
  SpaceInfo space{static_cast<uint64_t>(v.f_bavail) * v.f_frsize,
                  static_cast<uint64_t>(v.f_blocks) * v.f_frsize};
  if (auto left = FaultSpaceLeft(path)) space.free_bytes = std::min(space.free_bytes, *left);
  return space;
}

void Fd::Reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Result<File> File::Open(const std::string& path, Mode mode, bool direct) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case Mode::kReadOnly:
      flags |= O_RDONLY;
      break;
    case Mode::kReadWrite:
      flags |= O_RDWR;
      break;
    case Mode::kCreate:
      flags |= O_RDWR | O_CREAT;
      break;
    case Mode::kCreateExclusive:
      flags |= O_RDWR | O_CREAT | O_EXCL;
      break;
  }
  // Under a power-loss recorder a file this call makes is a new inode (never synced).
  bool made = false;
  if (PowerLossOn() && (flags & O_CREAT)) {
    made = mode == Mode::kCreateExclusive || ::access(path.c_str(), F_OK) != 0;
  }
  int fd = direct ? ::open(path.c_str(), flags | O_DIRECT, 0644) : -1;
  if (fd < 0 && direct && errno != EINVAL) {
    return Status::FromErrno(errno, fmt::format("open {}", path));
  }
  bool is_direct = fd >= 0;
  if (fd < 0) fd = ::open(path.c_str(), flags, 0644);  // tmpfs and the like: no O_DIRECT
  if (fd < 0) return Status::FromErrno(errno, fmt::format("open {}", path));
  if (made) PowerLossCreated(path);
  return File(Fd(fd), path, is_direct);
}

Result<uint64_t> File::Size() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return Status::FromErrno(errno, "fstat " + path_);
  return static_cast<uint64_t>(st.st_size);
}

Result<size_t> File::PReadSome(uint64_t offset, std::span<uint8_t> buf) const {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n =
        ::pread(fd_.get(), buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("read {} at {}", path_, offset + done));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Status File::PRead(uint64_t offset, std::span<uint8_t> buf) const {
  OSR_ASSIGN_OR_RETURN(size_t n, PReadSome(offset, buf));
  if (n != buf.size()) {
    return OutOfRange(
        fmt::format("read {}: {} bytes at {} pass the end of the file", path_, buf.size(), offset));
  }
  return Status::Ok();
}

namespace {

Status RawPWrite(int fd, const std::string& path, uint64_t offset, std::span<const uint8_t> data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n =
        ::pwrite(fd, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("write {} at {}", path, offset + done));
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Status File::PWrite(uint64_t offset, std::span<const uint8_t> data) {
  if (test_hooks.load(std::memory_order_relaxed) == 0) {
    return RawPWrite(fd_.get(), path_, offset, data);
  }
  auto held = HoldWrites();
  int fault_err = 0;
  size_t allowed = FaultAllows(path_, data.size(), &fault_err);
  if (fault_err != 0) {
    // The fault's short write: the bytes before the "full" point do reach the file (in
    // whole 4 KiB blocks with O_DIRECT, which takes nothing else).
    if (direct_) allowed = allowed / 4096 * 4096;
    OSR_RETURN_IF_ERROR(RawPWrite(fd_.get(), path_, offset, data.first(allowed)));
    return Status::FromErrno(fault_err, fmt::format("write {} at {}", path_, offset + allowed));
  }
  return RawPWrite(fd_.get(), path_, offset, data);
}

Status File::PWriteV(uint64_t offset, struct iovec* iov, int iovcnt) {
  if (test_hooks.load(std::memory_order_relaxed) != 0) {
    // Under a test hook: one PWrite per iovec, so that a fault cuts where it should.
    for (int i = 0; i < iovcnt; ++i) {
      OSR_RETURN_IF_ERROR(
          PWrite(offset, {static_cast<const uint8_t*>(iov[i].iov_base), iov[i].iov_len}));
      offset += iov[i].iov_len;
    }
    return Status::Ok();
  }
  while (iovcnt > 0) {
    ssize_t n = ::pwritev(fd_.get(), iov, std::min(iovcnt, IOV_MAX), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, fmt::format("write {} at {}", path_, offset));
    }
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::Ok();
}

Status File::Truncate(uint64_t size) {
  auto held = HoldWrites();
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "truncate " + path_);
  }
  return Status::Ok();
}

Status File::DataSync() {
  const uint32_t hooks = test_hooks.load(std::memory_order_relaxed);
  if (hooks != 0) {
    if (int err = FaultOnSync(path_); err != 0) return Status::FromErrno(err, "fdatasync " + path_);
    PowerLossSyncPoint(path_);
  }
  if (::fdatasync(fd_.get()) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
  if (hooks & kHookPowerLoss) PowerLossFileSynced(path_, fd_.get());
  return Status::Ok();
}

Status File::Sync() {
  const uint32_t hooks = test_hooks.load(std::memory_order_relaxed);
  if (hooks != 0) {
    if (int err = FaultOnSync(path_); err != 0) return Status::FromErrno(err, "fsync " + path_);
    PowerLossSyncPoint(path_);
  }
  if (::fsync(fd_.get()) != 0) return Status::FromErrno(errno, "fsync " + path_);
  if (hooks & kHookPowerLoss) PowerLossFileSynced(path_, fd_.get());
  return Status::Ok();
}

Status File::PunchHole(uint64_t offset, uint64_t length) {
  auto held = HoldWrites();
  if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    return Status::FromErrno(errno, fmt::format("punch hole {} at {}+{}", path_, offset, length));
  }
  return Status::Ok();
}

Status File::ZeroRange(uint64_t offset, uint64_t length) {
  auto held = HoldWrites();
  if (::fallocate(fd_.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(length)) != 0) {
    return Status::FromErrno(errno, fmt::format("zero range {} at {}+{}", path_, offset, length));
  }
  return Status::Ok();
}

Status File::WriteZeroes(uint64_t offset, uint64_t length) {
  static const std::vector<uint8_t> kZeros(1 << 20, 0);
  while (length > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(length, kZeros.size()));
    OSR_RETURN_IF_ERROR(PWrite(offset, {kZeros.data(), n}));
    offset += n;
    length -= n;
  }
  return Status::Ok();
}

Result<uint64_t> File::SeekData(uint64_t offset, uint64_t size) const {
  off_t r = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
  if (r < 0) {
    if (errno == ENXIO) return size;
    return Status::FromErrno(errno, "seek data " + path_);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), size);
}

Result<uint64_t> File::SeekHole(uint64_t offset, uint64_t size) const {
  off_t r = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_HOLE);
  if (r < 0) {
    if (errno == ENXIO) return size;
    return Status::FromErrno(errno, "seek hole " + path_);
  }
  return std::min<uint64_t>(static_cast<uint64_t>(r), size);
}

void File::Advise(uint64_t offset, uint64_t length, int advice) const {
  (void)::posix_fadvise(fd_.get(), static_cast<off_t>(offset), static_cast<off_t>(length), advice);
}

Status SyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open dir " + dir);
  Fd owner(fd);
  const bool power_loss = PowerLossOn();
  if (power_loss) PowerLossSyncPoint(dir);
  if (::fsync(fd) != 0) return Status::FromErrno(errno, "fsync dir " + dir);
  if (power_loss) PowerLossDirSynced(dir);
  return Status::Ok();
}

void RenamePath(const std::string& from, const std::string& to, std::error_code& ec) {
  PowerLossUnlinking(to);  // a file renamed over goes
  std::filesystem::rename(from, to, ec);
}

bool RemovePath(const std::string& path, std::error_code& ec) {
  PowerLossUnlinking(path);
  return std::filesystem::remove(path, ec);
}

uint64_t RemoveAllPaths(const std::string& path, std::error_code& ec) {
  PowerLossUnlinking(path);
  return static_cast<uint64_t>(std::filesystem::remove_all(path, ec));
}

bool CreateDirectories(const std::string& path, std::error_code& ec) {
  if (!PowerLossOn()) return std::filesystem::create_directories(path, ec);
  // The directories this call makes, outermost first, are new inodes.
  std::vector<std::string> made;
  for (std::filesystem::path p = std::filesystem::path(path).lexically_normal();
       !p.empty() && !std::filesystem::exists(p); p = p.parent_path()) {
    made.insert(made.begin(), p.string());
    if (p == p.parent_path()) break;
  }
  bool created = std::filesystem::create_directories(path, ec);
  for (const std::string& dir : made) PowerLossCreated(dir);
  return created;
}

Result<std::string> ReadSmallFile(const std::string& path, uint64_t bytes_max) {
  OSR_ASSIGN_OR_RETURN(File f, File::Open(path, File::Mode::kReadOnly));
  OSR_ASSIGN_OR_RETURN(uint64_t size, f.Size());
  if (size > bytes_max) {
    return Corruption(
        fmt::format("{} has {} bytes, more than such a file may have ({})", path, size, bytes_max));
  }
  std::string text(size, '\0');
  OSR_RETURN_IF_ERROR(f.PRead(0, {reinterpret_cast<uint8_t*>(text.data()), text.size()}));
  return text;
}

Status WriteFileAtomic(const std::string& path, std::span<const uint8_t> data, FilePerms perms) {
  std::string tmp = path + ".tmp";
  Status written = [&]() -> Status {
    OSR_ASSIGN_OR_RETURN(File f, File::Open(tmp, File::Mode::kCreate));
    // Before the data goes in: a temp file left from an older write may have other bits.
    if (perms == FilePerms::kOwnerOnly && ::fchmod(f.fd(), 0600) != 0) {
      return Status::FromErrno(errno, "chmod 0600 " + tmp);
    }
    OSR_RETURN_IF_ERROR(f.Truncate(0));
    OSR_RETURN_IF_ERROR(f.PWrite(0, data));
    OSR_RETURN_IF_ERROR(f.Sync());
    std::error_code ec;
    RenamePath(tmp, path, ec);
    if (ec) return Status::FromErrno(ec.value(), fmt::format("rename {} to {}", tmp, path));
    return Status::Ok();
  }();
  if (!written.ok()) {
    // Nothing half-written stays behind (a full file system: the space comes back too).
    std::error_code ec;
    RemovePath(tmp, ec);  // best effort: a temp file left behind is overwritten next time
    return written;
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  return SyncDir(dir.empty() ? "." : dir);
}

Status RaiseOpenFileLimit() {
  struct rlimit r {};
  if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return Status::FromErrno(errno, "getrlimit(NOFILE)");
  if (r.rlim_cur >= r.rlim_max) return Status::Ok();
  const rlim_t before = r.rlim_cur;
  r.rlim_cur = r.rlim_max;
  if (::setrlimit(RLIMIT_NOFILE, &r) != 0) {
    return Status::FromErrno(
        errno, fmt::format("raise the open-file limit from {} to {}", before, r.rlim_max));
  }
  return Status::Ok();
}

}  // namespace osr
