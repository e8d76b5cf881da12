#include "storage/disk_fault.hpp"

#include <limits>

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>

namespace keel::storage {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

rocksdb::IOStatus no_space() {
  return rocksdb::IOStatus::NoSpace("No space left on device (disk-full fault)");
}

class full_file final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  full_file(std::unique_ptr<rocksdb::FSWritableFile>&& f, std::shared_ptr<const disk_fault> fault)
      : FSWritableFileOwnerWrapper(std::move(f)), fault_(std::move(fault)) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    return target()->Append(data, o, dbg);
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& o,
                           const rocksdb::DataVerificationInfo& v,
                           rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    return target()->Append(data, o, v, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& o,
                                     rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    return target()->PositionedAppend(data, offset, o, dbg);
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, uint64_t offset,
                                     const rocksdb::IOOptions& o,
                                     const rocksdb::DataVerificationInfo& v,
                                     rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    return target()->PositionedAppend(data, offset, o, v, dbg);
  }

 private:
  std::shared_ptr<const disk_fault> fault_;
};

class full_fs final : public rocksdb::FileSystemWrapper {
 public:
  full_fs(std::shared_ptr<rocksdb::FileSystem> t, std::shared_ptr<const disk_fault> fault)
      : FileSystemWrapper(std::move(t)), fault_(std::move(fault)) {}

  const char* Name() const override { return "KeelDiskFault"; }

  // RocksDB's SstFileManager resumes writing after a full disk once it sees free space again.
  rocksdb::IOStatus GetFreeSpace(const std::string& path, const rocksdb::IOOptions& o,
                                 uint64_t* free, rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) {
      *free = 0;
      return rocksdb::IOStatus::OK();
    }
    return target()->GetFreeSpace(path, o, free, dbg);
  }

  rocksdb::IOStatus NewWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                    std::unique_ptr<rocksdb::FSWritableFile>* r,
                                    rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    auto s = target()->NewWritableFile(f, o, r, dbg);
    if (s.ok()) *r = std::make_unique<full_file>(std::move(*r), fault_);
    return s;
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& f, const rocksdb::FileOptions& o,
                                       std::unique_ptr<rocksdb::FSWritableFile>* r,
                                       rocksdb::IODebugContext* dbg) override {
    if (fault_->full()) return no_space();
    auto s = target()->ReopenWritableFile(f, o, r, dbg);
    if (s.ok()) *r = std::make_unique<full_file>(std::move(*r), fault_);
    return s;
  }

 private:
  std::shared_ptr<const disk_fault> fault_;
};

}  // namespace

void disk_fault::fill(std::chrono::milliseconds d) {
  until_ns_.store(
      d.count() <= 0 ? std::numeric_limits<int64_t>::max() : now_ns() + d.count() * 1'000'000,
      std::memory_order_relaxed);
}

bool disk_fault::full() const {
  auto until = until_ns_.load(std::memory_order_relaxed);
  return until != 0 && now_ns() < until;
}

std::unique_ptr<rocksdb::Env> faulty_env(std::shared_ptr<const disk_fault> fault) {
  return rocksdb::NewCompositeEnv(
      std::make_shared<full_fs>(rocksdb::FileSystem::Default(), std::move(fault)));
}

}  // namespace keel::storage
