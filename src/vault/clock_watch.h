// ClockWatch: notices when the vault's wall clock steps, so that no step can delete
// recovery points.
//
// Retention compares point times (wall clock) with "now" (wall clock). A wall clock that
// steps forward past the retention window would make one pass of retention delete every
// point; one that steps back would make a later correction look like the same. So the
// vault compares, at every tick of its point thread, how far the wall clock moved with
// how far the monotonic clock moved since a trusted reading (the anchor): when they
// disagree by more than kStepNsMin, the wall clock stepped, and pruning (retention,
// thinning, folding the store) is held while recovery points go on being made.
//
// The hold ends when
//   - an operator confirms the clock (POST /api/v1/clock/confirm, `osr point
//     confirm-clock`): the wall clock as it is now becomes the anchor;
//   - the wall clock comes back to within kStepNsMin of where the monotonic clock says it
//     should be (the step was undone, as when an operator's wrong `date -s` is corrected);
//   - or the wall clock has run steadily (no further step) for the settle time (one hour
//     by default) since its last step: a clock that stepped once and then keeps time is
//     taken as corrected. Retention then resumes on the new time. What still bounds the
//     harm of a step that was wrong but steady: retention never deletes the newest point
//     or a point in use, never deletes past a point it keeps for its age, and measures
//     age from min(now, the newest point's time) — the newest point's time comes from the
//     source site's clock, so one host's wrong clock alone deletes nothing early
//     (vault/retention.h).
//
// The state is saved in the catalog (meta key "clock", docs/formats.md) whenever it
// changes and every kSaveNs, with the boot id: a vault restarted in the same boot keeps
// its anchor (and so notices a step made while it was down); after a reboot the
// monotonic clock starts again, and only a wall clock earlier than the saved anchor is
// noticed (a step back), and a hold in force stays, its steady time counted anew.
//
// Thread model: not thread-safe; the vault guards it with a mutex.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace osr::vault {

// A step of the wall clock that holds pruning.
struct ClockHold {
  int64_t step_ns = 0;           // wall clock minus where the anchor says it should be (+: ahead)
  int64_t detected_wall_ns = 0;  // the wall time (after the step) when it was noticed
  // Since when the wall clock has kept time with the monotonic clock (after its last step).
  int64_t steady_wall_ns = 0;
  int64_t steady_mono_ns = 0;
};

class ClockWatch {
 public:
  // Smaller steps are NTP's ordinary corrections (and a leap second): not worth a hold.
  static constexpr int64_t kStepNsMin = 5'000'000'000;
  static constexpr int64_t kSettleNsDefault = 3600'000'000'000;
  static constexpr int64_t kSaveNs = 600'000'000'000;  // the anchor is saved this often

  enum class Change {
    kNone,      // nothing to save
    kAnchored,  // the anchor moved (first reading, or the periodic save)
    kStepped,   // a step was noticed: pruning is held
    kReturned,  // the wall clock came back to the anchor: the hold ended
    kSettled,   // the wall clock ran steadily for the settle time: the hold ended
    kConfirmed  // an operator confirmed the clock: the hold ended
  };

  // settle_ns: how long the wall clock must keep time after a step for the hold to end
  // by itself (> 0).
  explicit ClockWatch(int64_t settle_ns = kSettleNsDefault);

  // One reading of both clocks (the point thread's tick). Returns what changed; anything
  // but kNone is to be saved (ToJson) and logged.
  Change Observe(int64_t wall_ns, int64_t mono_ns);
  // The operator says the wall clock is right now: it becomes the anchor, the hold ends.
  Change Confirm(int64_t wall_ns, int64_t mono_ns);

  bool held() const { return hold_.has_value(); }
  const std::optional<ClockHold>& hold() const { return hold_; }
  // The wall time at which the hold ends by itself if the clock stays steady (0: none).
  int64_t SettlesAtWallNs() const;
  // The item health warning while held ("" otherwise).
  std::string HealthWarning() const;
  // {held, step_seconds, stepped_at, settles_at} for the API.
  nlohmann::json StatusJson() const;

  // The saved state: {version: 1, boot_id, anchor_wall_ns, anchor_mono_ns, hold}.
  nlohmann::json ToJson(const std::string& boot_id) const;
  // Takes a saved state back (see the file comment for a different boot); a state of
  // the wrong shape is ignored (the watch starts afresh: it cannot be worse than no
  // saved state). Returns kStepped when the restore itself reveals a step back.
  Change Restore(const nlohmann::json& saved, const std::string& boot_id, int64_t wall_ns,
                 int64_t mono_ns);

 private:
  void Anchor(int64_t wall_ns, int64_t mono_ns);

  int64_t settle_ns_;
  bool anchored_ = false;
  int64_t anchor_wall_ns_ = 0;
  int64_t anchor_mono_ns_ = 0;
  int64_t saved_mono_ns_ = 0;  // when the anchor was last handed out to save
  std::optional<ClockHold> hold_;
};

// This boot's id (/proc/sys/kernel/random/boot_id), "" if it cannot be read.
std::string BootId();

// "2 h 5 min", "45 s": a duration for people, rounded to what matters.
std::string FormatDurationNs(int64_t ns);

}  // namespace osr::vault
