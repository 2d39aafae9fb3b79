/*
 * tls.c: OpenSSL contexts for listeners and dialers, and a generator of
 * development certificates (core.tls).
 *
 * A server context holds a default certificate and optional extra ones
 * chosen by SNI. A client context verifies peers against a CA file or the
 * system store unless told not to. Every OpenSSL failure clears the error
 * queue and names the call that failed.
 */
#include "internal.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <arpa/inet.h>

#define JV_TLS_MT "justavps.tls_context"

typedef struct {
  char *name; /* lower-case host name or "*.suffix" */
  SSL_CTX *ctx;
} jv_sni_entry_t;

typedef struct {
  SSL_CTX *ctx;
  int server;
  jv_sni_entry_t *sni;
  size_t nsni;
} jv_tls_t;


/* Pushes nil, "CALL failed: reason", "tls_error" and clears the queue. */
static int
push_ssl_error(lua_State *L, const char *call)
{
  unsigned long e = ERR_peek_last_error();
  char reason[256];

  if (e != 0) {
    jv__openssl_reason(e, reason, sizeof(reason));

  } else {
    snprintf(reason, sizeof(reason), "unknown error");
  }

  ERR_clear_error();
  lua_pushnil(L);
  lua_pushfstring(L, "%s failed: %s", call, reason);
  lua_pushstring(L, jv_err_name(JV_ETLS));
  return 3;
}


SSL_CTX *
jv__tls_check(lua_State *L, int idx, int server)
{
  jv_tls_t *t = luaL_checkudata(L, idx, JV_TLS_MT);

  if (t->ctx == NULL) {
    luaL_error(L, "attempt to use a freed TLS context");
  }

  if (server && !t->server) {
    luaL_error(L, "a server TLS context is required here");
  }

  if (!server && t->server) {
    luaL_error(L, "a client TLS context is required here");
  }

  return t->ctx;
}


static int
l_tls_gc(lua_State *L)
{
  jv_tls_t *t = luaL_checkudata(L, 1, JV_TLS_MT);
  size_t i;

  for (i = 0; i < t->nsni; i++) {
    free(t->sni[i].name);
    SSL_CTX_free(t->sni[i].ctx);
  }

  free(t->sni);
  t->sni = NULL;
  t->nsni = 0;

  SSL_CTX_free(t->ctx);
  t->ctx = NULL;
  return 0;
}


static SSL_CTX *
new_server_ctx(void)
{
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

  if (ctx == NULL) {
    return NULL;
  }

  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  return ctx;
}


/* Loads a certificate chain and its key; on failure pushes the error
 * triple naming the file and returns 3. */
static int
load_pair(lua_State *L, SSL_CTX *ctx, const char *cert, const char *key)
{
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    lua_pushfstring(L, "SSL_CTX_use_certificate_chain_file(%s)", cert);
    return push_ssl_error(L, lua_tostring(L, -1));
  }

  if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
    lua_pushfstring(L, "SSL_CTX_use_PrivateKey_file(%s)", key);
    return push_ssl_error(L, lua_tostring(L, -1));
  }

  if (SSL_CTX_check_private_key(ctx) != 1) {
    lua_pushfstring(L, "SSL_CTX_check_private_key(%s)", key);
    return push_ssl_error(L, lua_tostring(L, -1));
  }

  return 0;
}


static int
name_matches(const char *pattern, const char *host)
{
  size_t plen, hlen;
  const char *dot;

  if (strcasecmp(pattern, host) == 0) {
    return 1;
  }

  if (pattern[0] != '*' || pattern[1] != '.') {
    return 0;
  }

  /* "*.example.com" matches exactly one label before "example.com". */
  dot = strchr(host, '.');
  if (dot == NULL || dot == host) {
    return 0;
  }

  plen = strlen(pattern + 1);
  hlen = strlen(dot);
  return plen == hlen && strcasecmp(pattern + 1, dot) == 0;
}


static int
sni_cb(SSL *ssl, int *alert, void *arg)
{
  jv_tls_t *t = arg;
  const char *host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  size_t i;

  if (host == NULL) {
    return SSL_TLSEXT_ERR_NOACK;
  }

  for (i = 0; i < t->nsni; i++) {
    if (name_matches(t->sni[i].name, host)) {
      SSL_set_SSL_CTX(ssl, t->sni[i].ctx);
      return SSL_TLSEXT_ERR_OK;
    }
  }

  /* Unknown names get the default certificate. */
  return SSL_TLSEXT_ERR_OK;
}


/*
 * core.tls.server_context{cert=, key=, sni={{names={...}, cert=, key=}, ...}}
 * cert and key are PEM file paths; the default pair serves clients whose
 * SNI matches no entry. Returns a context or nil, message, "tls_error".
 */
static int
l_server_context(lua_State *L)
{
  const char *cert, *key;
  jv_tls_t *t;
  int rc, i, j, n, m;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "cert");
  cert = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "key");
  key = luaL_checkstring(L, -1);

  t = lua_newuserdata(L, sizeof(*t));
  memset(t, 0, sizeof(*t));
  t->server = 1;
  luaL_getmetatable(L, JV_TLS_MT);
  lua_setmetatable(L, -2);

  t->ctx = new_server_ctx();
  if (t->ctx == NULL) {
    return push_ssl_error(L, "SSL_CTX_new");
  }

  rc = load_pair(L, t->ctx, cert, key);
  if (rc != 0) {
    return rc;
  }

  lua_getfield(L, 1, "sni");
  if (lua_istable(L, -1)) {
    int sni_index = lua_gettop(L);

    n = (int) lua_objlen(L, sni_index);
    for (i = 1; i <= n; i++) {
      SSL_CTX *sctx;

      lua_rawgeti(L, sni_index, i);
      luaL_checktype(L, -1, LUA_TTABLE);
      lua_getfield(L, -1, "cert");
      lua_getfield(L, -2, "key");
      lua_getfield(L, -3, "names");
      luaL_checktype(L, -1, LUA_TTABLE);

      sctx = new_server_ctx();
      if (sctx == NULL) {
        return push_ssl_error(L, "SSL_CTX_new");
      }

      rc = load_pair(L, sctx, luaL_checkstring(L, -3), luaL_checkstring(L, -2));
      if (rc != 0) {
        SSL_CTX_free(sctx);
        return rc;
      }

      m = (int) lua_objlen(L, -1);
      for (j = 1; j <= m; j++) {
        jv_sni_entry_t *grown;

        lua_rawgeti(L, -1, j);
        grown = realloc(t->sni, (t->nsni + 1) * sizeof(*grown));
        if (grown == NULL) {
          SSL_CTX_free(sctx);
          return luaL_error(L, "out of memory");
        }
        t->sni = grown;
        t->sni[t->nsni].name = strdup(luaL_checkstring(L, -1));
        t->sni[t->nsni].ctx = sctx;
        /* Each name holds a reference so the gc frees each once. */
        if (j > 1) {
          SSL_CTX_up_ref(sctx);
        }
        t->nsni++;
        lua_pop(L, 1);
      }

      if (m == 0) {
        SSL_CTX_free(sctx);
      }

      lua_pop(L, 4);
    }

    SSL_CTX_set_tlsext_servername_callback(t->ctx, sni_cb);
    SSL_CTX_set_tlsext_servername_arg(t->ctx, t);
  }

  lua_pop(L, 1);
  return 1;
}


/*
 * core.tls.client_context{ca=path, verify=true}: verify defaults to true;
 * without ca the system store is used. Returns a context or nil, message,
 * "tls_error".
 */
static int
l_client_context(lua_State *L)
{
  const char *ca = NULL;
  int verify = 1;
  jv_tls_t *t;

  if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "ca");
    ca = lua_tostring(L, -1);
    lua_getfield(L, 1, "verify");
    if (!lua_isnil(L, -1)) {
      verify = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
  }

  t = lua_newuserdata(L, sizeof(*t));
  memset(t, 0, sizeof(*t));
  luaL_getmetatable(L, JV_TLS_MT);
  lua_setmetatable(L, -2);

  t->ctx = SSL_CTX_new(TLS_client_method());
  if (t->ctx == NULL) {
    return push_ssl_error(L, "SSL_CTX_new");
  }

  SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
  SSL_CTX_set_mode(t->ctx, SSL_MODE_RELEASE_BUFFERS);

  if (verify) {
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);

    if (ca != NULL) {
      if (SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1) {
        lua_pushfstring(L, "SSL_CTX_load_verify_locations(%s)", ca);
        return push_ssl_error(L, lua_tostring(L, -1));
      }

    } else if (SSL_CTX_set_default_verify_paths(t->ctx) != 1) {
      return push_ssl_error(L, "SSL_CTX_set_default_verify_paths");
    }

  } else {
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_NONE, NULL);
  }

  return 1;
}


/* ---- certificate generation for development ---- */

static EVP_PKEY *
load_key(const char *path)
{
  EVP_PKEY *key = NULL;
  FILE *f = fopen(path, "r");

  if (f != NULL) {
    key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
  }

  return key;
}


static X509 *
load_cert(const char *path)
{
  X509 *cert = NULL;
  FILE *f = fopen(path, "r");

  if (f != NULL) {
    cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
  }

  return cert;
}


static int
add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
  X509V3_CTX v3;
  X509_EXTENSION *ext;

  X509V3_set_ctx_nodb(&v3);
  X509V3_set_ctx(&v3, issuer, cert, NULL, NULL, 0);
  ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
  if (ext == NULL) {
    return -1;
  }

  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  return 0;
}


/* Writes key (mode 0600) and cert (mode 0644) as PEM files. */
static int
write_pem(const char *key_path, EVP_PKEY *key, const char *cert_path,
          X509 *cert)
{
  FILE *f;
  int fd, ok;

  fd = open(key_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) {
    return -1;
  }

  fchmod(fd, 0600);
  f = fdopen(fd, "w");
  if (f == NULL) {
    close(fd);
    return -1;
  }

  ok = PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL);
  if (fclose(f) != 0 || !ok) {
    return -1;
  }

  f = fopen(cert_path, "w");
  if (f == NULL) {
    return -1;
  }

  ok = PEM_write_X509(f, cert);
  if (fclose(f) != 0 || !ok) {
    return -1;
  }

  return 0;
}


/*
 * core.tls.generate{cert_out=, key_out=, cn=, names={...}, days=, ca=true,
 *                   issuer_cert=, issuer_key=}
 * Makes a P-256 key and an X.509 certificate. names become the
 * subjectAltName (IP literals as IP entries, the rest as DNS names). With
 * ca=true it is a CA certificate; with issuer_cert and issuer_key it is
 * signed by that CA, otherwise self-signed. Returns true or nil, message,
 * code.
 */
static int
l_generate(lua_State *L)
{
  const char *cert_out, *key_out, *cn, *issuer_cert, *issuer_key;
  int days, is_ca, i, n;
  EVP_PKEY *key = NULL, *ikey = NULL;
  X509 *cert = NULL, *icert = NULL;
  X509_NAME *name;
  unsigned char serial[16];
  BIGNUM *bn = NULL;
  luaL_Buffer san;
  int nret;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "cert_out");
  cert_out = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "key_out");
  key_out = luaL_checkstring(L, -1);
  lua_getfield(L, 1, "cn");
  cn = luaL_optstring(L, -1, "justavps development");
  lua_getfield(L, 1, "days");
  days = (int) luaL_optinteger(L, -1, 825);
  lua_getfield(L, 1, "ca");
  is_ca = lua_toboolean(L, -1);
  lua_getfield(L, 1, "issuer_cert");
  issuer_cert = lua_tostring(L, -1);
  lua_getfield(L, 1, "issuer_key");
  issuer_key = lua_tostring(L, -1);

  luaL_argcheck(L, days > 0 && days <= 3650, 1, "days must be 1-3650");
  luaL_argcheck(L, (issuer_cert == NULL) == (issuer_key == NULL), 1,
                "issuer_cert and issuer_key go together");

  /* subjectAltName: "DNS:a,IP:127.0.0.1,..." */
  luaL_buffinit(L, &san);
  lua_getfield(L, 1, "names");
  n = lua_istable(L, -1) ? (int) lua_objlen(L, -1) : 0;
  for (i = 1; i <= n; i++) {
    unsigned char tmp[16];
    const char *v;

    lua_rawgeti(L, -1, i);
    v = luaL_checkstring(L, -1);
    lua_pop(L, 1);

    if (i > 1) {
      luaL_addchar(&san, ',');
    }

    if (inet_pton(AF_INET, v, tmp) == 1 || inet_pton(AF_INET6, v, tmp) == 1) {
      luaL_addstring(&san, "IP:");

    } else {
      luaL_addstring(&san, "DNS:");
    }

    luaL_addstring(&san, v);
  }
  lua_pop(L, 1);
  luaL_pushresult(&san);

  key = EVP_EC_gen("P-256");
  if (key == NULL) {
    nret = push_ssl_error(L, "EVP_EC_gen");
    goto cleanup;
  }

  if (issuer_cert != NULL) {
    icert = load_cert(issuer_cert);
    ikey = load_key(issuer_key);
    if (icert == NULL || ikey == NULL) {
      lua_pushfstring(L, "reading issuer %s / %s", issuer_cert, issuer_key);
      nret = push_ssl_error(L, lua_tostring(L, -1));
      goto cleanup;
    }
  }

  cert = X509_new();
  if (cert == NULL || RAND_bytes(serial, sizeof(serial)) != 1) {
    nret = push_ssl_error(L, "X509_new");
    goto cleanup;
  }

  serial[0] &= 0x7f; /* a positive serial */
  bn = BN_bin2bn(serial, sizeof(serial), NULL);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert));
  X509_set_version(cert, 2);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), (long) days * 86400);
  X509_set_pubkey(cert, key);

  name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             (const unsigned char *) cn, -1, -1, 0);
  X509_set_issuer_name(cert, icert ? X509_get_subject_name(icert) : name);

  if (add_ext(cert, icert ? icert : cert, NID_basic_constraints,
              is_ca ? "critical,CA:TRUE" : "critical,CA:FALSE") != 0 ||
      add_ext(cert, icert ? icert : cert, NID_key_usage,
              is_ca ? "critical,keyCertSign,cRLSign"
                    : "critical,digitalSignature,keyEncipherment") != 0 ||
      add_ext(cert, icert ? icert : cert, NID_subject_key_identifier, "hash") !=
          0) {
    nret = push_ssl_error(L, "X509V3_EXT_conf_nid");
    goto cleanup;
  }

  if (!is_ca && add_ext(cert, icert ? icert : cert, NID_ext_key_usage,
                        "serverAuth,clientAuth") != 0) {
    nret = push_ssl_error(L, "X509V3_EXT_conf_nid(extendedKeyUsage)");
    goto cleanup;
  }

  if (n > 0 && add_ext(cert, icert ? icert : cert, NID_subject_alt_name,
                       lua_tostring(L, -1)) != 0) {
    nret = push_ssl_error(L, "X509V3_EXT_conf_nid(subjectAltName)");
    goto cleanup;
  }

  if (X509_sign(cert, ikey ? ikey : key, EVP_sha256()) == 0) {
    nret = push_ssl_error(L, "X509_sign");
    goto cleanup;
  }

  if (write_pem(key_out, key, cert_out, cert) != 0) {
    nret = jv__push_error_msg(L, UV_EIO,
                              "cannot write the certificate or "
                              "key file");
    goto cleanup;
  }

  lua_pushboolean(L, 1);
  nret = 1;

cleanup:
  BN_free(bn);
  X509_free(cert);
  X509_free(icert);
  EVP_PKEY_free(key);
  EVP_PKEY_free(ikey);
  ERR_clear_error();
  return nret;
}


int
jv__open_tls(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "server_context", l_server_context },
                                    { "client_context", l_client_context },
                                    { "generate", l_generate },
                                    { NULL, NULL } };

  luaL_newmetatable(L, JV_TLS_MT);
  lua_pushcfunction(L, l_tls_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
