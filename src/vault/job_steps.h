// Steps: records a job's steps and progress in the job row and the catalog as they
// happen, so that `osr job show`, the web UI and a vault restarted after a crash all see
// how far a job came.
#pragma once

#include <string>

#include "vault/catalog.h"

namespace osr::vault {

class Steps {
 public:
  Steps(Catalog* c, JobRow* j) : c_(c), j_(j) {}
  void Begin(const std::string& name) {
    j_->steps.push_back({{"name", name}, {"state", "Running"}, {"message", ""}});
    Save();
  }
  void Done(int progress) {
    j_->steps.back()["state"] = "Succeeded";
    j_->progress = progress;
    Save();
  }
  void Progress(int progress, const std::string& message) {
    j_->progress = progress;
    j_->steps.back()["message"] = message;
    Save();
  }
  // The step failed but the job goes on (e.g. the source did not shut down in time).
  void Warn(int progress, const std::string& message) {
    j_->steps.back()["state"] = "Failed";
    j_->steps.back()["message"] = message;
    j_->progress = progress;
    Save();
  }
  void Fail(const Status& st) {
    if (!j_->steps.empty()) {
      j_->steps.back()["state"] = "Failed";
      j_->steps.back()["message"] = st.message();
    }
    j_->state = "Failed";
    j_->error = st.message();
  }
  void Save() {
    j_->updated_ns = NowNs();
    (void)c_->UpdateJob(*j_);
  }

 private:
  Catalog* c_;
  JobRow* j_;
};

}  // namespace osr::vault
