#include "wire/convert.hpp"

#include <string>

namespace keel::wire {

Error::Kind to_wire(errc code) {
  switch (code) {
    case errc::none:
      return Error::Kind::NONE;
    case errc::overloaded:
      return Error::Kind::OVERLOADED;
    case errc::disconnected:
    case errc::stale_epoch:  // the session moved to another node: reconnect, retry there
      return Error::Kind::DISCONNECTED;
    case errc::unimplemented:
      return Error::Kind::UNIMPLEMENTED;
    case errc::bad_request:
      return Error::Kind::BAD_REQUEST;
    case errc::not_found:
      return Error::Kind::NOT_FOUND;
    case errc::unauthenticated:
      return Error::Kind::UNAUTHENTICATED;
    case errc::failed:
    case errc::corrupt_record:
    case errc::bad_model:
      return Error::Kind::FAILED;
  }
  return Error::Kind::FAILED;
}

errc from_wire(Error::Kind kind) {
  switch (kind) {
    case Error::Kind::NONE:
      return errc::none;
    case Error::Kind::FAILED:
      return errc::failed;
    case Error::Kind::OVERLOADED:
      return errc::overloaded;
    case Error::Kind::DISCONNECTED:
      return errc::disconnected;
    case Error::Kind::BAD_REQUEST:
      return errc::bad_request;
    case Error::Kind::NOT_FOUND:
      return errc::not_found;
    case Error::Kind::UNIMPLEMENTED:
      return errc::unimplemented;
    case Error::Kind::UNAUTHENTICATED:
      return errc::unauthenticated;
  }
  // A kind added by a newer peer: treat it as a failure we cannot mend.
  return errc::failed;
}

void to_wire(const caf::error& err, Error::Builder out, uint32_t retry_after_ms) {
  if (!err) {
    out.setKind(Error::Kind::NONE);
    return;
  }
  auto code = code_of(err);
  out.setKind(to_wire(code));
  auto msg = message_of(err);
  if (msg.empty()) msg = caf::to_string(err);
  out.setMessage(msg);
  if (code == errc::overloaded) out.setRetryAfterMs(retry_after_ms);
}

caf::error from_wire(Error::Reader in) {
  auto code = from_wire(in.getKind());
  if (code == errc::none) return {};
  std::string msg = in.getMessage().cStr();
  if (code == errc::overloaded && in.getRetryAfterMs() > 0)
    msg += std::string(retry_after_prefix) + std::to_string(in.getRetryAfterMs()) + " ms)";
  return make_error(code, std::move(msg));
}

caf::error from_kj(const kj::Exception& e, const std::string& where) {
  errc code = errc::failed;
  switch (e.getType()) {
    case kj::Exception::Type::DISCONNECTED:
      code = errc::disconnected;
      break;
    case kj::Exception::Type::OVERLOADED:
      code = errc::overloaded;
      break;
    case kj::Exception::Type::UNIMPLEMENTED:
      code = errc::unimplemented;
      break;
    case kj::Exception::Type::FAILED:
      break;
  }
  std::string text = e.getDescription().cStr();
  return make_error(code, where.empty() ? text : where + ": " + text);
}

void to_wire(const sampling_params& p, SamplingParams::Builder out) {
  out.setTemperature(p.temperature);
  out.setTopK(p.top_k);
  out.setTopP(p.top_p);
  out.setMinP(p.min_p);
  out.setRepetitionPenalty(p.repetition_penalty);
  out.setRepetitionWindow(p.repetition_window);
  out.setSeed(p.seed);
}

sampling_params from_wire(SamplingParams::Reader in) {
  sampling_params p;
  p.temperature = in.getTemperature();
  p.top_k = in.getTopK();
  p.top_p = in.getTopP();
  p.min_p = in.getMinP();
  p.repetition_penalty = in.getRepetitionPenalty();
  p.repetition_window = in.getRepetitionWindow();
  p.seed = in.getSeed();
  return p;
}

}  // namespace keel::wire

namespace keel::wire {

FinishReason to_wire(finish_reason r) {
  switch (r) {
    case finish_reason::length: return FinishReason::LENGTH;
    case finish_reason::eos: return FinishReason::EOS;
    case finish_reason::context: return FinishReason::CONTEXT;
    case finish_reason::cancelled: return FinishReason::CANCELLED;
    case finish_reason::overloaded: return FinishReason::OVERLOADED;
    case finish_reason::failed: return FinishReason::FAILED;
    case finish_reason::filtered: return FinishReason::FILTERED;
  }
  return FinishReason::FAILED;
}

finish_reason from_wire(FinishReason r) {
  switch (r) {
    case FinishReason::LENGTH: return finish_reason::length;
    case FinishReason::EOS: return finish_reason::eos;
    case FinishReason::CONTEXT: return finish_reason::context;
    case FinishReason::CANCELLED: return finish_reason::cancelled;
    case FinishReason::OVERLOADED: return finish_reason::overloaded;
    case FinishReason::FAILED: return finish_reason::failed;
    case FinishReason::FILTERED: return finish_reason::filtered;
  }
  return finish_reason::failed;
}

}  // namespace keel::wire
