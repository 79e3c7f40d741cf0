// The replication messages as pure functions: what each payload must hold, the error
// that names a bad field, and the ERROR codes' wire numbers (which never change).
#include "replication/messages.h"

#include <gtest/gtest.h>

#include "replication/wire.h"

namespace osr::replication {
namespace {

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(Messages, ErrorCodesKeepTheirNumbersAndNames) {
  const std::pair<ErrorCode, std::string_view> table[] = {
      {ErrorCode::kInternal, "internal"},
      {ErrorCode::kBadFrame, "bad_frame"},
      {ErrorCode::kCorruptFrame, "corrupt_frame"},
      {ErrorCode::kUnsupportedVersion, "unsupported_version"},
      {ErrorCode::kUnknownGroup, "unknown_group"},
      {ErrorCode::kBadDisks, "bad_disks"},
      {ErrorCode::kStaleEpoch, "stale_epoch"},
      {ErrorCode::kEpochAhead, "epoch_ahead"},
      {ErrorCode::kNotAuthorized, "not_authorized"},
      {ErrorCode::kStoreFailed, "store_failed"},
      {ErrorCode::kNoSpace, "no_space"},
  };
  uint16_t n = 1;
  for (auto [code, name] : table) {
    EXPECT_EQ(static_cast<uint16_t>(code), n) << name;  // docs/formats.md lists these
    EXPECT_EQ(ErrorCodeName(code), name);
    EXPECT_EQ(ErrorCodeFromNumber(n), code);
    ++n;
  }
  EXPECT_EQ(n, kErrorCodeLast + 1);
  EXPECT_FALSE(ErrorCodeFromNumber(0).has_value());
  EXPECT_FALSE(ErrorCodeFromNumber(kErrorCodeLast + 1).has_value());
  EXPECT_FALSE(ErrorCodeFromNumber(UINT64_MAX).has_value());
}

TEST(Messages, HelloRoundTripsAndNamesABadField) {
  Hello h;
  h.version = kProtocolVersion;
  h.group = "vm1";
  h.epoch = 7;
  h.lz4 = true;
  h.disks = {{"os", 1 << 20}, {"data", 2 << 20}};
  auto back = ParseHello(Bytes(EncodeHello(h)));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->group, "vm1");
  EXPECT_EQ(back->epoch, 7u);
  EXPECT_TRUE(back->lz4);
  ASSERT_EQ(back->disks.size(), 2u);
  EXPECT_EQ(back->disks[1].name, "data");
  EXPECT_EQ(back->disks[1].size_bytes, 2u << 20);

  const std::pair<std::string, std::string> bad[] = {
      {R"({"version":"1"})", "HELLO.version: must be a whole number"},
      {R"({"group":"vm1","epoch":1,"disks":[]})", "HELLO.version: is missing"},
      {R"({"version":1,"epoch":1,"disks":[]})", "HELLO.group: is missing"},
      {R"({"version":1,"group":"vm1","disks":[]})", "HELLO.epoch: is missing"},
      {R"({"version":1,"group":"vm1","epoch":1})", "HELLO.disks: is missing"},
      {R"({"version":1,"group":"vm1","epoch":1.5,"disks":[]})", "HELLO.epoch"},
      {R"({"version":1,"group":"a/b","epoch":1,"disks":[]})", "HELLO.group: is not a valid name"},
      {R"({"version":1,"group":"vm1","epoch":1,"disks":[],"compress":"lz4"})", "HELLO.compress"},
      {R"({"version":1,"group":"vm1","epoch":1,"disks":[{"name":1,"size_bytes":1}]})",
       "HELLO.disks[0].name"},
      {R"({"version":1,"group":"vm1","epoch":1,"disks":[{"name":"a"}]})",
       "HELLO.disks[0].size_bytes: is missing"},
      {"null", "HELLO: must be a JSON object"},
      {"", "HELLO: not valid JSON"},
      {std::string(20, '{'), "HELLO: nested deeper than 8"},
  };
  for (auto& [payload, want] : bad) {
    auto r = ParseHello(Bytes(payload));
    ASSERT_FALSE(r.ok()) << payload;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_NE(r.status().message().find(want), std::string::npos)
        << payload << " -> " << r.status().message();
  }
  std::string many = R"({"version":1,"group":"vm1","epoch":1,"disks":[)";
  for (size_t i = 0; i <= kHelloDisksMax; ++i) {
    many += std::string(i ? "," : "") + R"({"name":"d","size_bytes":1})";
  }
  many += "]}";
  EXPECT_FALSE(ParseHello(Bytes(many)).ok());
  EXPECT_FALSE(ParseHello(Bytes(std::string(kControlBytesMax + 1, ' '))).ok());
}

TEST(Messages, HelloOkAndResyncPayloads) {
  HelloOk ok{5, 2, true, true, false, std::nullopt, true};
  auto back = ParseHelloOk(Bytes(EncodeHelloOk(ok)));
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(back->resyncing);
  EXPECT_FALSE(ParseHelloOk(Bytes(R"({"durable_seq":1,"resyncing":"no"})")).ok());
  EXPECT_EQ(back->durable_seq, 5u);
  EXPECT_EQ(back->base_seq, 2u);
  EXPECT_TRUE(back->lz4);
  EXPECT_TRUE(back->initial_sync);
  EXPECT_FALSE(back->differential);
  // An older receiver's HELLO_OK: no initial_sync, differential, compress.
  back = ParseHelloOk(Bytes(R"({"durable_seq":3,"base_seq":0})"));
  ASSERT_TRUE(back.ok());
  EXPECT_FALSE(back->initial_sync || back->differential || back->lz4);
  auto r = ParseHelloOk(Bytes(R"({"durable_seq":"x"})"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("HELLO_OK.durable_seq"), std::string::npos);
  EXPECT_FALSE(ParseHelloOk(Bytes(R"({"durable_seq":1,"differential":"yes"})")).ok());

  EXPECT_FALSE(back->staged.has_value());  // nothing staged: the field is left out
  // A staged copy (a resync cut short) and how far it reaches.
  ok.staged = HelloStaged{40, true, 1 << 20, 1, 3 << 20};
  back = ParseHelloOk(Bytes(EncodeHelloOk(ok)));
  ASSERT_TRUE(back.ok());
  ASSERT_TRUE(back->staged.has_value());
  EXPECT_EQ(back->staged->from, 40u);
  EXPECT_TRUE(back->staged->initial);
  EXPECT_EQ(back->staged->bytes, 1u << 20);
  EXPECT_EQ(back->staged->end_disk, 1u);
  EXPECT_EQ(back->staged->end_offset, 3u << 20);
  r = ParseHelloOk(Bytes(R"({"durable_seq":1,"staged":{"from":1,"bytes":"x"}})"));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("HELLO_OK.staged.bytes"), std::string::npos);
  EXPECT_FALSE(ParseHelloOk(Bytes(R"({"durable_seq":1,"staged":[]})")).ok());
  EXPECT_FALSE(
      ParseHelloOk(
          Bytes(
              R"({"durable_seq":1,"staged":{"from":1,"bytes":1,"end_offset":1,"end_disk":4294967296}})"))
          .ok());

  auto b = ParseResyncBegin(Bytes(EncodeResyncBegin({9, true, false, 0})));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->from, 9u);
  EXPECT_TRUE(b->initial);
  EXPECT_EQ(b->resume_bytes, 0u);  // an older sender's RESYNC_BEGIN: start over
  b = ParseResyncBegin(Bytes(EncodeResyncBegin({9, false, false, 12345})));
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->resume_bytes, 12345u);
  EXPECT_FALSE(ParseResyncBegin(Bytes(R"({"from":1,"resume_bytes":true})")).ok());
  // A resume goes on with staged regions; it cannot replace a history too.
  EXPECT_FALSE(
      ParseResyncBegin(Bytes(R"({"from":1,"replace_history":true,"resume_bytes":5})")).ok());
  EXPECT_FALSE(ParseResyncBegin(Bytes(R"({"initial":true})")).ok());
  EXPECT_FALSE(ParseResyncBegin(Bytes(R"({"from":-1})")).ok());
  auto rb = ParseResyncBegin(Bytes(EncodeResyncBegin({12, false, true, 0})));
  ASSERT_TRUE(rb.ok());
  EXPECT_TRUE(rb->replace_history);
  EXPECT_EQ(rb->from, 12u);
  EXPECT_FALSE(
      ParseResyncBegin(Bytes(EncodeResyncBegin({9, true, false, 0}))).value().replace_history);
  auto both = ParseResyncBegin(Bytes(R"({"from":3,"initial":true,"replace_history":true})"));
  ASSERT_FALSE(both.ok());
  EXPECT_NE(both.status().message().find("replace_history"), std::string::npos);
  EXPECT_FALSE(ParseResyncBegin(Bytes(R"({"from":3,"replace_history":1})")).ok());
  auto e = ParseResyncEnd(Bytes(EncodeResyncEnd({12})), "RESYNC_END");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->consistent_seq, 12u);
  auto bad = ParseResyncEnd(Bytes(R"({"consistent_seq":[]})"), "RESYNC_DONE");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("RESYNC_DONE.consistent_seq"), std::string::npos);

  std::vector<uint8_t> data(12 + 3, 0);
  data[0] = 2;
  data[4] = 0x10;
  data[12] = 0xab;
  auto d = ParseResyncData(data);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->disk, 2u);
  EXPECT_EQ(d->offset, 0x10u);
  ASSERT_EQ(d->bytes.size(), 3u);
  EXPECT_EQ(d->bytes[0], 0xab);
  EXPECT_FALSE(ParseResyncData(std::span<const uint8_t>(data).first(11)).ok());
}

TEST(Messages, AnErrorIsAnErrorHoweverItIsWritten) {
  auto e = ParseError(Bytes(EncodeError({ErrorCode::kStaleEpoch, "stale epoch 1"})));
  EXPECT_EQ(e.code, ErrorCode::kStaleEpoch);
  EXPECT_EQ(e.message, "stale epoch 1");
  EXPECT_NE(EncodeError({ErrorCode::kEpochAhead, "x"}).find(R"("name":"epoch_ahead")"),
            std::string::npos);
  // An older peer's text code, an unknown number, no JSON, control characters.
  e = ParseError(Bytes(R"({"code":"permission denied","message":"stale epoch 1"})"));
  EXPECT_EQ(e.code, ErrorCode::kInternal);
  EXPECT_NE(e.message.find("stale epoch 1"), std::string::npos);
  e = ParseError(Bytes(R"({"code":99,"message":"new"})"));
  EXPECT_EQ(e.code, ErrorCode::kInternal);
  EXPECT_NE(e.message.find("code 99"), std::string::npos);
  e = ParseError(Bytes(std::string("\x01\xff\n", 3)));
  EXPECT_EQ(e.code, ErrorCode::kInternal);
  EXPECT_EQ(e.message.find('\n'), std::string::npos);
  EXPECT_EQ(e.message.find('\xff'), std::string::npos);
  e = ParseError(Bytes(EncodeError({ErrorCode::kBadFrame, std::string(100000, 'm')})));
  EXPECT_EQ(e.code, ErrorCode::kBadFrame);
  EXPECT_LE(e.message.size(), kErrorMessageBytesMax + 3);
  // Not UTF-8 in a message of ours: still valid JSON.
  e = ParseError(Bytes(EncodeError({ErrorCode::kInternal, "bad \xff byte"})));
  EXPECT_NE(e.message.find("bad"), std::string::npos);
}

}  // namespace
}  // namespace osr::replication
