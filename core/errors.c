/*
 * errors.c: names and messages for the core's error codes, and the helpers
 * that hand an expected failure to Lua as nil, message, code.
 */
/* The per-library string loaders that jv__openssl_reason calls are
 * deprecated in OpenSSL 3.0 but still exported, and the only way to load
 * the strings after OPENSSL_INIT_NO_LOAD_CRYPTO_STRINGS. */
#define OPENSSL_SUPPRESS_DEPRECATED

#include "internal.h"

#include <openssl/asn1err.h>
#include <openssl/bioerr.h>
#include <openssl/bnerr.h>
#include <openssl/buffererr.h>
#include <openssl/conferr.h>
#include <openssl/cryptoerr.h>
#include <openssl/err.h>
#include <openssl/evperr.h>
#include <openssl/objectserr.h>
#include <openssl/pemerr.h>
#include <openssl/randerr.h>
#include <openssl/ssl.h>
#include <openssl/sslerr.h>
#include <openssl/x509err.h>
#include <openssl/x509v3err.h>


const char *
jv_err_name(int code)
{
  switch (code) {
#define XX(name, value, word, message)                                         \
  case value:                                                                  \
    return word;
    JV_ERRNO_MAP(XX)
#undef XX
  case UV_EOF:
    return "closed";
  case UV_ETIMEDOUT:
    return "timeout";
  default:
    return uv_err_name(code);
  }
}


const char *
jv_strerror(int code)
{
  switch (code) {
#define XX(name, value, word, message)                                         \
  case value:                                                                  \
    return message;
    JV_ERRNO_MAP(XX)
#undef XX
  case UV_EOF:
    return "connection closed";
  default:
    return uv_strerror(code);
  }
}


int
jv__push_error(lua_State *L, int code)
{
  lua_pushnil(L);
  lua_pushstring(L, jv_strerror(code));
  lua_pushstring(L, jv_err_name(code));
  return 3;
}


int
jv__push_error_msg(lua_State *L, int code, const char *message)
{
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, jv_err_name(code));
  return 3;
}


void
jv__openssl_no_strings(void)
{
  OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CRYPTO_STRINGS, NULL);
  OPENSSL_init_ssl(OPENSSL_INIT_NO_LOAD_SSL_STRINGS, NULL);
}


void
jv__openssl_reason(unsigned long e, char *buf, size_t size)
{
  static int loaded;

  if (!loaded) {
    /* Each loader skips a library whose strings are loaded already. */
    loaded = 1;
    ERR_load_ERR_strings();
    ERR_load_CRYPTO_strings();
    ERR_load_SSL_strings();
    ERR_load_X509_strings();
    ERR_load_X509V3_strings();
    ERR_load_EVP_strings();
    ERR_load_PEM_strings();
    ERR_load_ASN1_strings();
    ERR_load_BIO_strings();
    ERR_load_BN_strings();
    ERR_load_BUF_strings();
    ERR_load_OBJ_strings();
    ERR_load_CONF_strings();
    ERR_load_RAND_strings();
  }

  ERR_error_string_n(e, buf, size);
}
