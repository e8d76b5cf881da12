#include "wire/tls.hpp"

#include <fstream>
#include <sstream>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <kj/debug.h>

#include "base/error.hpp"

namespace keel::wire {

namespace {

caf::error bad(const std::string& flag, const std::string& path, const std::string& why) {
  return make_error(errc::bad_request, "--" + flag + " " + path + ": " + why);
}

caf::expected<std::string> read_pem(const std::string& flag, const std::string& path) {
  if (path.empty()) return bad(flag, "''", "no file given");
  std::ifstream in(path, std::ios::binary);
  if (!in) return bad(flag, path, "cannot open the file");
  std::ostringstream s;
  s << in.rdbuf();
  auto text = s.str();
  if (text.find("-----BEGIN ") == std::string::npos)
    return bad(flag, path, "not a PEM file (no '-----BEGIN' line)");
  return text;
}

std::string openssl_reason() {
  auto code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "unknown OpenSSL error";
  char buf[256];
  ERR_error_string_n(code, buf, sizeof buf);
  return buf;
}

struct bio_deleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct x509_deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct key_deleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct store_deleter {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
struct store_ctx_deleter {
  void operator()(X509_STORE_CTX* s) const { X509_STORE_CTX_free(s); }
};
struct stack_deleter {
  void operator()(STACK_OF(X509) * s) const { sk_X509_pop_free(s, X509_free); }
};

std::unique_ptr<BIO, bio_deleter> bio_of(const std::string& text) {
  return std::unique_ptr<BIO, bio_deleter>(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

/// Every certificate in `pem`, in order.
std::vector<std::unique_ptr<X509, x509_deleter>> certificates(const std::string& pem) {
  std::vector<std::unique_ptr<X509, x509_deleter>> out;
  auto bio = bio_of(pem);
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr))
    out.emplace_back(x);
  ERR_clear_error();  // the end of the file reads as an error
  return out;
}

/// Checks that `cert_pem`'s first certificate is signed by `ca_pem` (through the chain that
/// follows it in the file) and valid now.
caf::error check_chain(const tls_files& f, const std::string& cert_pem, const std::string& ca_pem) {
  auto cas = certificates(ca_pem);
  if (cas.empty()) return bad("tls-ca", f.ca, "no certificate in the file");
  auto chain = certificates(cert_pem);
  if (chain.empty()) return bad("tls-cert", f.cert, "no certificate in the file");
  std::unique_ptr<X509_STORE, store_deleter> store(X509_STORE_new());
  for (auto& c : cas) X509_STORE_add_cert(store.get(), c.get());
  std::unique_ptr<STACK_OF(X509), stack_deleter> rest(sk_X509_new_null());
  for (size_t i = 1; i < chain.size(); ++i) {
    X509_up_ref(chain[i].get());
    sk_X509_push(rest.get(), chain[i].get());
  }
  std::unique_ptr<X509_STORE_CTX, store_ctx_deleter> ctx(X509_STORE_CTX_new());
  X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].get(), rest.get());
  if (X509_verify_cert(ctx.get()) != 1) {
    return bad("tls-cert", f.cert,
               std::string("not valid under --tls-ca ") + f.ca + ": " +
                   X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get())));
  }
  return {};
}

}  // namespace

caf::expected<std::shared_ptr<const tls_config>> tls_config::load(const tls_files& files) {
  auto out = std::make_shared<tls_config>();
  out->files_ = files;
  if (files.ca.empty())
    return make_error(errc::bad_request, "--tls-ca FILE is required for TLS (the cluster's CA)");
  auto ca = read_pem("tls-ca", files.ca);
  if (!ca) return std::move(ca.error());
  if (certificates(*ca).empty()) return bad("tls-ca", files.ca, "no certificate in the file");
  out->ca_pem_ = std::move(*ca);
  if (files.cert.empty() != files.key.empty()) {
    return make_error(errc::bad_request,
                      files.cert.empty() ? "--tls-key needs --tls-cert (the certificate it signs)"
                                         : "--tls-cert needs --tls-key (its private key)");
  }
  if (files.cert.empty()) return out;
  auto cert = read_pem("tls-cert", files.cert);
  if (!cert) return std::move(cert.error());
  auto key = read_pem("tls-key", files.key);
  if (!key) return std::move(key.error());
  if (auto err = check_chain(files, *cert, out->ca_pem_)) return err;
  auto kb = bio_of(*key);
  std::unique_ptr<EVP_PKEY, key_deleter> pkey(
      PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr));
  if (!pkey) return bad("tls-key", files.key, "no private key in the file: " + openssl_reason());
  auto chain = certificates(*cert);
  if (X509_check_private_key(chain[0].get(), pkey.get()) != 1) {
    ERR_clear_error();
    return bad("tls-key", files.key, "does not match the certificate in --tls-cert " + files.cert);
  }
  out->cert_pem_ = std::move(*cert);
  out->key_pem_ = std::move(*key);
  return out;
}

kj::Own<kj::TlsContext> tls_config::context(bool verify_clients) const {
  kj::TlsCertificate ca(kj::StringPtr(ca_pem_.c_str()));
  kj::TlsContext::Options o;
  o.useSystemTrustStore = false;
  o.trustedCertificates = kj::arrayPtr(&ca, 1);
  o.verifyClients = verify_clients;
  kj::Maybe<kj::TlsKeypair> pair;
  if (has_keypair()) {
    pair = kj::TlsKeypair{kj::TlsPrivateKey(kj::StringPtr(key_pem_.c_str())),
                          kj::TlsCertificate(kj::StringPtr(cert_pem_.c_str()))};
    KJ_IF_MAYBE (p, pair) { o.defaultKeypair = *p; }
  }
  // OpenSSL takes its own references to the certificates and the key: they need not outlive
  // the context.
  return kj::heap<kj::TlsContext>(kj::mv(o));
}

kj::Promise<kj::AuthenticatedStream> secure_accepted(kj::TlsContext* tls, kj::Timer& timer,
                                                     kj::AuthenticatedStream s) {
  if (tls == nullptr) return kj::mv(s);
  return timer.timeoutAfter(handshake_timeout.count() * kj::MILLISECONDS,
                            tls->wrapServer(kj::mv(s)));
}

std::string host_of(const std::string& address) {
  auto colon = address.rfind(':');
  auto host = colon == std::string::npos ? address : address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return host;
}

kj::Promise<kj::AuthenticatedStream> connect_to(kj::Network& network, kj::Timer& timer,
                                                kj::TlsContext* tls, const std::string& address,
                                                const std::string& server_name,
                                                std::chrono::milliseconds timeout) {
  auto name = server_name.empty() ? host_of(address) : server_name;
  auto connected =
      network.parseAddress(address)
          .then([](kj::Own<kj::NetworkAddress> a) {
            return a->connectAuthenticated().attach(kj::mv(a));
          })
          .then([tls, name](kj::AuthenticatedStream s) -> kj::Promise<kj::AuthenticatedStream> {
            if (tls == nullptr) return kj::mv(s);
            return tls->wrapClient(kj::mv(s), name);
          });
  auto late = timer.afterDelay(timeout.count() * kj::MILLISECONDS)
                  .then([address, timeout]() -> kj::Promise<kj::AuthenticatedStream> {
                    return KJ_EXCEPTION(DISCONNECTED, "no connection to " + address + " within " +
                                                          std::to_string(timeout.count()) + " ms");
                  });
  return connected.exclusiveJoin(kj::mv(late));
}

bool certified_as(kj::PeerIdentity& id, const std::string& name) {
  auto* t = dynamic_cast<kj::TlsPeerIdentity*>(&id);
  if (t == nullptr || !t->hasCertificate() || name.empty()) return false;
  // kj 0.9 declares TlsPeerIdentity::matchesHostname but does not define it: the common name.
  return t->getCommonName() == kj::StringPtr(name.c_str());
}

}  // namespace keel::wire
