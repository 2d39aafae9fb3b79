/*
 * crypto.c: core.crypto, the hashes, MACs, encodings, random values and
 * password hashes that Lua needs, backed by OpenSSL 3.
 *
 * Misuse (a wrong type, a size out of range) raises a Lua error. An
 * expected failure returns nil, message, code: "invalid" for malformed hex
 * or base64 input, "crypto_error" when an OpenSSL call fails. Every OpenSSL
 * failure clears the thread's error queue and names the failed call.
 */
#include "internal.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JV_SHA256_MT "justavps.sha256"

/* TODO: move into JV_ERRNO_MAP in jv.h so jv_err_name() returns it too. */
#define JV_CRYPTO_ERROR "crypto_error"

/* Bounds for random_bytes and random_token: large enough for any key or
 * token, small enough that a wrong argument cannot allocate gigabytes. */
#define JV_RANDOM_MAX 65536

/* Derived keys longer than this have no use and only cost time. */
#define JV_KDF_MAX_LENGTH 1024

/* scrypt needs 128 * r * (N + p + 2) bytes. 1 GiB admits N = 2^17, r = 8
 * (128 MiB, a common recommendation for password storage) several times
 * over, and stops a typo from asking for tens of gigabytes. */
#define JV_SCRYPT_MAX_MEMORY ((uint64_t) 1 << 30)

/* EVP_EncodeBlock and EVP_DecodeBlock take an int length, so long inputs
 * go through in chunks of this many groups of 3 (encode) or 4 (decode). */
#define JV_BASE64_CHUNK_GROUPS (1 << 20)


/* Formats "<call> failed: <reason>" from this thread's OpenSSL error queue
 * into buf and clears the queue, so a stale error never shows up in the
 * report of a later call. */
static void
format_openssl_error(const char *call, char *buf, size_t size)
{
  unsigned long e = ERR_peek_last_error();
  char reason[256];

  if (e != 0) {
    jv__openssl_reason(e, reason, sizeof(reason));
  } else {
    snprintf(reason, sizeof(reason), "no reason in the OpenSSL error queue");
  }

  ERR_clear_error();
  snprintf(buf, size, "%s failed: %s", call, reason);
}


static int
push_openssl_error(lua_State *L, const char *call)
{
  char message[320];

  format_openssl_error(call, message, sizeof(message));
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, JV_CRYPTO_ERROR);
  return 3;
}


/* Returns the bytes of argument idx, raising unless it is a string. Numbers
 * are rejected rather than converted, because hashing the decimal form of a
 * number passed by mistake would produce a valid-looking wrong result. */
static const unsigned char *
check_bytes(lua_State *L, int idx, size_t *len)
{
  luaL_checktype(L, idx, LUA_TSTRING);
  return (const unsigned char *) lua_tolstring(L, idx, len);
}


/* Returns an integer argument in [min, max], raising otherwise. */
static lua_Integer
check_range(lua_State *L, int idx, lua_Integer min, lua_Integer max)
{
  lua_Number n = luaL_checknumber(L, idx);

  /* Comparing as doubles first keeps NaN and huge values away from the
   * integer conversion, where they would be undefined behaviour. */
  if (!(n >= (lua_Number) min && n <= (lua_Number) max) ||
      n != (lua_Number) (lua_Integer) n) {
    lua_pushfstring(L, "must be an integer from %d to %d", (int) min,
                    (int) max);
    luaL_argerror(L, idx, lua_tostring(L, -1));
  }

  return (lua_Integer) n;
}


/* Returns scratch memory owned by a userdata on the stack, so the garbage
 * collector frees it even when a later call raises. */
static unsigned char *
push_scratch(lua_State *L, size_t size)
{
  return lua_newuserdata(L, size > 0 ? size : 1);
}


/* HMAC contexts already keyed, for the few keys a process signs with
 * (a broker secret, a JWT secret, a machine token). OpenSSL's one-shot
 * HMAC() fetches the algorithm and derives the padded keys on every call.
 * Re-initialising a keyed EVP_MAC_CTX with a NULL key reuses them: 239
 * against 1214 ns for a 100-byte message, measured with a small C program
 * on this project's 2-vCPU VM. Keys longer than HMAC_CACHE_KEY_MAX go
 * through HMAC() uncached. */
#define HMAC_CACHE_SLOTS   16
#define HMAC_CACHE_KEY_MAX 256

typedef struct {
  EVP_MAC_CTX *ctx;
  size_t key_len;
  unsigned char key[HMAC_CACHE_KEY_MAX];
} hmac_slot_t;

static EVP_MAC *hmac_algorithm;
static hmac_slot_t hmac_slots[HMAC_CACHE_SLOTS];
static unsigned hmac_next_slot;


/* Returns a new HMAC-SHA256 context keyed with key, or NULL when OpenSSL
 * fails. */
static EVP_MAC_CTX *
hmac_new_context(const unsigned char *key, size_t key_len)
{
  OSSL_PARAM params[2];
  EVP_MAC_CTX *ctx;

  if (hmac_algorithm == NULL) {
    hmac_algorithm = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (hmac_algorithm == NULL) {
      return NULL;
    }
  }

  ctx = EVP_MAC_CTX_new(hmac_algorithm);
  if (ctx == NULL) {
    return NULL;
  }
  params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                               (char *) "SHA256", 0);
  params[1] = OSSL_PARAM_construct_end();
  if (EVP_MAC_init(ctx, key, key_len, params) != 1) {
    EVP_MAC_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}


/* Returns a keyed context for key, from the cache or made now (evicting
 * the oldest slot), or NULL when OpenSSL fails. */
static EVP_MAC_CTX *
hmac_context(const unsigned char *key, size_t key_len)
{
  hmac_slot_t *slot;
  unsigned i;

  for (i = 0; i < HMAC_CACHE_SLOTS; i++) {
    slot = &hmac_slots[i];
    if (slot->ctx != NULL && slot->key_len == key_len &&
        memcmp(slot->key, key, key_len) == 0) {
      return EVP_MAC_init(slot->ctx, NULL, 0, NULL) == 1 ? slot->ctx : NULL;
    }
  }

  slot = &hmac_slots[hmac_next_slot];
  hmac_next_slot = (hmac_next_slot + 1) % HMAC_CACHE_SLOTS;
  EVP_MAC_CTX_free(slot->ctx);
  OPENSSL_cleanse(slot->key, sizeof(slot->key));
  slot->key_len = 0;

  slot->ctx = hmac_new_context(key, key_len);
  if (slot->ctx == NULL) {
    return NULL;
  }
  memcpy(slot->key, key, key_len);
  slot->key_len = key_len;
  return slot->ctx;
}


/* crypto.hmac_sha256(key, data) -> 32 raw bytes */
static int
l_hmac_sha256(lua_State *L)
{
  size_t key_len, data_len, out_len = 0;
  const unsigned char *key = check_bytes(L, 1, &key_len);
  const unsigned char *data = check_bytes(L, 2, &data_len);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int mac_len = 0;
  EVP_MAC_CTX *ctx;

  luaL_argcheck(L, key_len <= INT_MAX, 1, "key too long");

  if (key_len > 0 && key_len <= HMAC_CACHE_KEY_MAX) {
    ctx = hmac_context(key, key_len);
    if (ctx == NULL || EVP_MAC_update(ctx, data, data_len) != 1 ||
        EVP_MAC_final(ctx, mac, &out_len, sizeof(mac)) != 1) {
      return push_openssl_error(L, "EVP_MAC");
    }
    lua_pushlstring(L, (const char *) mac, out_len);
    return 1;
  }

  if (HMAC(EVP_sha256(), key, (int) key_len, data, data_len, mac, &mac_len) ==
      NULL) {
    return push_openssl_error(L, "HMAC");
  }

  lua_pushlstring(L, (const char *) mac, mac_len);
  return 1;
}


/* Bytes collected for one EVP_MAC_update, so that OpenSSL gets a few
 * large updates rather than two small ones per field. */
typedef struct {
  EVP_MAC_CTX *ctx;
  size_t used;
  unsigned char buf[512];
} mac_chunk_t;


/* Adds len bytes of data to the MAC through chunk. Returns 0, or -1 when
 * OpenSSL fails. */
static int
mac_chunk_add(mac_chunk_t *chunk, const char *data, size_t len)
{
  if (chunk->used + len > sizeof(chunk->buf)) {
    if (EVP_MAC_update(chunk->ctx, chunk->buf, chunk->used) != 1) {
      return -1;
    }
    chunk->used = 0;
  }
  if (len > sizeof(chunk->buf)) {
    return EVP_MAC_update(chunk->ctx, (const unsigned char *) data, len) == 1
               ? 0
               : -1;
  }
  memcpy(chunk->buf + chunk->used, data, len);
  chunk->used += len;
  return 0;
}


int
jv__hmac_sha256_join_hex(const unsigned char *key, size_t key_len,
                         const char *sep, size_t sep_len,
                         const char *const *parts, const size_t *lens,
                         unsigned n, char *hex)
{
  static const char digits[] = "0123456789abcdef";
  unsigned char mac[EVP_MAX_MD_SIZE];
  size_t out_len = 0, i;
  mac_chunk_t chunk;
  int owned = key_len == 0 || key_len > HMAC_CACHE_KEY_MAX, failed = 0;

  chunk.ctx =
      owned ? hmac_new_context(key, key_len) : hmac_context(key, key_len);
  if (chunk.ctx == NULL) {
    return -1;
  }
  chunk.used = 0;

  for (i = 0; i < n && !failed; i++) {
    failed = (i > 0 && mac_chunk_add(&chunk, sep, sep_len) != 0) ||
             mac_chunk_add(&chunk, parts[i], lens[i]) != 0;
  }
  failed = failed || EVP_MAC_update(chunk.ctx, chunk.buf, chunk.used) != 1 ||
           EVP_MAC_final(chunk.ctx, mac, &out_len, sizeof(mac)) != 1 ||
           out_len != 32;
  if (owned) {
    EVP_MAC_CTX_free(chunk.ctx);
  }
  if (failed) {
    return -1;
  }

  for (i = 0; i < 32; i++) {
    hex[2 * i] = digits[mac[i] >> 4];
    hex[2 * i + 1] = digits[mac[i] & 0x0f];
  }
  return 0;
}


/* crypto.hmac_sha256_join(key, sep, field, ...) -> lowercase hex of the
 * HMAC-SHA256 of the fields (strings or numbers) joined with sep. It
 * makes no Lua string for the joined text, the raw MAC or its hex, which
 * signing at the edge and checking at the broker would otherwise make. */
static int
l_hmac_sha256_join(lua_State *L)
{
  static const char digits[] = "0123456789abcdef";
  size_t key_len, sep_len, len, out_len = 0, i;
  const unsigned char *key = check_bytes(L, 1, &key_len);
  const char *sep = luaL_checklstring(L, 2, &sep_len);
  const char *field;
  unsigned char mac[EVP_MAX_MD_SIZE];
  char hex[2 * EVP_MAX_MD_SIZE];
  mac_chunk_t chunk;
  int n = lua_gettop(L), arg, owned, failed = 0;

  luaL_argcheck(L, n >= 3, 3, "at least one field expected");
  /* Every field is checked before a context is made, so that a raise
   * cannot leave one behind. */
  for (arg = 3; arg <= n; arg++) {
    luaL_checklstring(L, arg, NULL);
  }

  /* Keys the cache does not take get a context of their own. */
  owned = key_len == 0 || key_len > HMAC_CACHE_KEY_MAX;
  chunk.ctx =
      owned ? hmac_new_context(key, key_len) : hmac_context(key, key_len);
  if (chunk.ctx == NULL) {
    return push_openssl_error(L, "EVP_MAC");
  }
  chunk.used = 0;

  for (arg = 3; arg <= n && !failed; arg++) {
    field = lua_tolstring(L, arg, &len);
    failed = (arg > 3 && mac_chunk_add(&chunk, sep, sep_len) != 0) ||
             mac_chunk_add(&chunk, field, len) != 0;
  }
  failed = failed || EVP_MAC_update(chunk.ctx, chunk.buf, chunk.used) != 1 ||
           EVP_MAC_final(chunk.ctx, mac, &out_len, sizeof(mac)) != 1;
  if (owned) {
    EVP_MAC_CTX_free(chunk.ctx);
  }
  if (failed) {
    return push_openssl_error(L, "EVP_MAC");
  }

  for (i = 0; i < out_len; i++) {
    hex[2 * i] = digits[mac[i] >> 4];
    hex[2 * i + 1] = digits[mac[i] & 0x0f];
  }
  lua_pushlstring(L, hex, 2 * out_len);
  return 1;
}


static int
push_digest(lua_State *L, const EVP_MD *md, const char *call)
{
  size_t len;
  const unsigned char *data = check_bytes(L, 1, &len);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;

  if (EVP_Digest(data, len, digest, &digest_len, md, NULL) != 1) {
    return push_openssl_error(L, call);
  }

  lua_pushlstring(L, (const char *) digest, digest_len);
  return 1;
}


/* crypto.sha256(data) -> 32 raw bytes */
static int
l_sha256(lua_State *L)
{
  return push_digest(L, EVP_sha256(), "EVP_Digest(SHA-256)");
}


/* crypto.sha1(data) -> 20 raw bytes. Only for protocols that fix SHA-1,
 * such as the WebSocket accept key. */
static int
l_sha1(lua_State *L)
{
  return push_digest(L, EVP_sha1(), "EVP_Digest(SHA-1)");
}


/*
 * Incremental SHA-256 for data that arrives in pieces, such as a streamed
 * upload: crypto.sha256_new(), then h:update(s) any number of times, then
 * h:final() once.
 */
typedef struct {
  EVP_MD_CTX *ctx; /* NULL after final() */
} jv_sha256_t;


static jv_sha256_t *
check_sha256(lua_State *L)
{
  jv_sha256_t *h = luaL_checkudata(L, 1, JV_SHA256_MT);

  if (h->ctx == NULL) {
    luaL_error(L, "sha256 object already finalized: create a new one "
                  "with crypto.sha256_new()");
  }

  return h;
}


/* crypto.sha256_new() -> object */
static int
l_sha256_new(lua_State *L)
{
  jv_sha256_t *h = lua_newuserdata(L, sizeof(*h));

  /* The metatable goes on first, so __gc frees the context even if a
   * later step fails. */
  h->ctx = NULL;
  luaL_getmetatable(L, JV_SHA256_MT);
  lua_setmetatable(L, -2);

  h->ctx = EVP_MD_CTX_new();
  if (h->ctx == NULL) {
    return push_openssl_error(L, "EVP_MD_CTX_new");
  }

  if (EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
    EVP_MD_CTX_free(h->ctx);
    h->ctx = NULL;
    return push_openssl_error(L, "EVP_DigestInit_ex");
  }

  return 1;
}


/* h:update(data) -> h, so calls can be chained */
static int
l_sha256_update(lua_State *L)
{
  jv_sha256_t *h = check_sha256(L);
  size_t len;
  const unsigned char *data = check_bytes(L, 2, &len);

  if (EVP_DigestUpdate(h->ctx, data, len) != 1) {
    return push_openssl_error(L, "EVP_DigestUpdate");
  }

  lua_settop(L, 1);
  return 1;
}


/* h:final() -> 32 raw bytes. The object cannot be used afterwards. */
static int
l_sha256_final(lua_State *L)
{
  jv_sha256_t *h = check_sha256(L);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  int ok = EVP_DigestFinal_ex(h->ctx, digest, &digest_len);

  EVP_MD_CTX_free(h->ctx);
  h->ctx = NULL;

  if (ok != 1) {
    return push_openssl_error(L, "EVP_DigestFinal_ex");
  }

  lua_pushlstring(L, (const char *) digest, digest_len);
  return 1;
}


static int
l_sha256_gc(lua_State *L)
{
  jv_sha256_t *h = luaL_checkudata(L, 1, JV_SHA256_MT);

  EVP_MD_CTX_free(h->ctx);
  h->ctx = NULL;
  return 0;
}


/*
 * Hex. OpenSSL's OPENSSL_buf2hexstr writes upper case and
 * OPENSSL_hexstr2buf accepts colon separators, so neither matches the
 * lowercase, separator-free form the signatures use.
 */
static int
hex_value(unsigned char c)
{
  if (c >= '0' && c <= '9') {
    return c - '0';
  }

  if (c >= 'a' && c <= 'f') {
    return c - 'a' + 10;
  }

  if (c >= 'A' && c <= 'F') {
    return c - 'A' + 10;
  }

  return -1;
}


/* crypto.hex_encode(data) -> lowercase hex */
static int
l_hex_encode(lua_State *L)
{
  static const char digits[] = "0123456789abcdef";
  size_t len, i;
  const unsigned char *data = check_bytes(L, 1, &len);
  unsigned char small[256];
  unsigned char *out;

  if (len > SIZE_MAX / 2) {
    return jv__push_error(L, JV_ETOOLARGE);
  }

  /* The hex of a digest fits on the stack, so it needs no scratch
   * userdata for the garbage collector. */
  out = len <= sizeof(small) / 2 ? small : push_scratch(L, len * 2);

  for (i = 0; i < len; i++) {
    out[2 * i] = digits[data[i] >> 4];
    out[2 * i + 1] = digits[data[i] & 0x0f];
  }

  lua_pushlstring(L, (const char *) out, len * 2);
  return 1;
}


/* crypto.hex_decode(hex) -> bytes, or nil, message, "invalid". Upper and
 * lower case digits are both accepted. */
static int
l_hex_decode(lua_State *L)
{
  char message[96];
  size_t len, i;
  const unsigned char *hex = check_bytes(L, 1, &len);
  unsigned char *out;

  if (len % 2 != 0) {
    snprintf(message, sizeof(message),
             "invalid hex: odd length %zu, expected two digits per byte", len);
    return jv__push_error_msg(L, JV_EINVALID, message);
  }

  out = push_scratch(L, len / 2);

  for (i = 0; i < len; i += 2) {
    int high = hex_value(hex[i]);
    int low = hex_value(hex[i + 1]);

    if (high < 0 || low < 0) {
      snprintf(message, sizeof(message),
               "invalid hex: character at offset %zu is not a hex digit",
               high < 0 ? i : i + 1);
      return jv__push_error_msg(L, JV_EINVALID, message);
    }

    out[i / 2] = (unsigned char) (high << 4 | low);
  }

  lua_pushlstring(L, (const char *) out, len / 2);
  return 1;
}


/*
 * Base64 (RFC 4648). EVP_EncodeBlock and EVP_DecodeBlock do the work. The
 * checks before decoding exist because EVP_DecodeBlock skips surrounding
 * whitespace, counts padding as output bytes and accepts non-zero bits
 * after the last byte. With the checks, every byte string has exactly one
 * accepted encoding.
 */
static size_t
base64_encoded_size(size_t len)
{
  return (len + 2) / 3 * 4;
}


/* Writes the padded standard encoding of data to out, which must hold
 * base64_encoded_size(len) + 1 bytes because OpenSSL adds a NUL. */
static void
base64_encode_into(unsigned char *out, const unsigned char *data, size_t len)
{
  const size_t chunk = (size_t) JV_BASE64_CHUNK_GROUPS * 3;

  while (len > 0) {
    size_t n = len < chunk ? len : chunk;

    out += EVP_EncodeBlock(out, data, (int) n);
    data += n;
    len -= n;
  }

  *out = '\0';
}


static int
push_base64_encoding(lua_State *L, int url)
{
  size_t len, size, i;
  const unsigned char *data = check_bytes(L, 1, &len);
  unsigned char *out;

  if (len > (SIZE_MAX - 1) / 4 * 3 - 3) {
    return jv__push_error(L, JV_ETOOLARGE);
  }

  size = base64_encoded_size(len);
  out = push_scratch(L, size + 1);
  base64_encode_into(out, data, len);

  if (url) {
    for (i = 0; i < size; i++) {
      if (out[i] == '+') {
        out[i] = '-';
      } else if (out[i] == '/') {
        out[i] = '_';
      }
    }

    while (size > 0 && out[size - 1] == '=') {
      size--;
    }
  }

  lua_pushlstring(L, (const char *) out, size);
  return 1;
}


/* crypto.base64_encode(data) -> standard alphabet, padded */
static int
l_base64_encode(lua_State *L)
{
  return push_base64_encoding(L, 0);
}


/* crypto.base64url_encode(data) -> URL-safe alphabet, no padding */
static int
l_base64url_encode(lua_State *L)
{
  return push_base64_encoding(L, 1);
}


static int
base64_value(unsigned char c)
{
  if (c >= 'A' && c <= 'Z') {
    return c - 'A';
  }

  if (c >= 'a' && c <= 'z') {
    return c - 'a' + 26;
  }

  if (c >= '0' && c <= '9') {
    return c - '0' + 52;
  }

  if (c == '+') {
    return 62;
  }

  if (c == '/') {
    return 63;
  }

  return -1;
}


/*
 * Checks that s is canonical padded standard base64 and returns the number
 * of padding characters (0, 1 or 2). On failure returns -1 with a message
 * in buf. The offsets in messages count from the start of the caller's
 * input, which for base64url is the same string before translation.
 */
static int
base64_validate(const unsigned char *s, size_t len, char *buf, size_t size)
{
  size_t padding = 0, i;
  int last;

  if (len % 4 != 0) {
    snprintf(buf, size, "invalid base64: length %zu is not a multiple of 4",
             len);
    return -1;
  }

  while (padding < 2 && padding < len && s[len - 1 - padding] == '=') {
    padding++;
  }

  for (i = 0; i < len - padding; i++) {
    if (base64_value(s[i]) < 0) {
      snprintf(buf, size,
               "invalid base64: character at offset %zu is not in the "
               "alphabet",
               i);
      return -1;
    }
  }

  /* The last data character carries 4 (one '=') or 2 (two '=') bits
   * beyond the last byte, and a canonical encoding leaves them zero. */
  if (padding > 0) {
    last = base64_value(s[len - padding - 1]);
    if ((padding == 1 && (last & 0x03) != 0) ||
        (padding == 2 && (last & 0x0f) != 0)) {
      snprintf(buf, size,
               "invalid base64: non-zero bits after the last byte at "
               "offset %zu",
               len - padding - 1);
      return -1;
    }
  }

  return (int) padding;
}


/* Decodes validated, padded standard base64 into out and returns the
 * number of bytes, or -1 when EVP_DecodeBlock fails (which the validation
 * should make impossible). */
static int64_t
base64_decode_into(unsigned char *out, const unsigned char *s, size_t len,
                   int padding)
{
  const size_t chunk = (size_t) JV_BASE64_CHUNK_GROUPS * 4;
  size_t total = 0;

  while (len > 0) {
    size_t n = len < chunk ? len : chunk;
    int written = EVP_DecodeBlock(out + total, s, (int) n);

    if (written < 0) {
      return -1;
    }

    total += (size_t) written;
    s += n;
    len -= n;
  }

  return (int64_t) (total - (size_t) padding);
}


static int
push_base64_decoding(lua_State *L, const unsigned char *s, size_t len,
                     char *message, size_t size)
{
  int padding = base64_validate(s, len, message, size);
  unsigned char *out;
  int64_t n;

  if (padding < 0) {
    return jv__push_error_msg(L, JV_EINVALID, message);
  }

  out = push_scratch(L, len / 4 * 3);
  n = base64_decode_into(out, s, len, padding);

  if (n < 0) {
    return push_openssl_error(L, "EVP_DecodeBlock");
  }

  lua_pushlstring(L, (const char *) out, (size_t) n);
  return 1;
}


/* crypto.base64_decode(s) -> bytes, or nil, message, "invalid". Padding is
 * required. */
static int
l_base64_decode(lua_State *L)
{
  char message[128];
  size_t len;
  const unsigned char *s = check_bytes(L, 1, &len);

  return push_base64_decoding(L, s, len, message, sizeof(message));
}


/* crypto.base64url_decode(s) -> bytes, or nil, message, "invalid". Accepts
 * the input with or without '=' padding; rejects '+' and '/'. */
static int
l_base64url_decode(lua_State *L)
{
  char message[128];
  size_t len, padded_len, i;
  const unsigned char *s = check_bytes(L, 1, &len);
  unsigned char *standard;

  /* Translate to the standard alphabet and restore the padding, then share
   * the standard decoder and its checks. */
  if (len % 4 == 1) {
    snprintf(message, sizeof(message),
             "invalid base64url: length %zu leaves a single character in "
             "the last group",
             len);
    return jv__push_error_msg(L, JV_EINVALID, message);
  }

  padded_len = len % 4 == 0 ? len : len + 4 - len % 4;
  standard = push_scratch(L, padded_len);

  for (i = 0; i < len; i++) {
    unsigned char c = s[i];

    if (c == '=' && len % 4 != 0) {
      snprintf(message, sizeof(message),
               "invalid base64url: padding at offset %zu does not complete "
               "the last group of 4",
               i);
      return jv__push_error_msg(L, JV_EINVALID, message);
    }

    if (c == '+' || c == '/') {
      snprintf(message, sizeof(message),
               "invalid base64url: character at offset %zu is not in the "
               "URL-safe alphabet",
               i);
      return jv__push_error_msg(L, JV_EINVALID, message);
    }

    if (c == '-') {
      c = '+';
    } else if (c == '_') {
      c = '/';
    }

    standard[i] = c;
  }

  for (i = len; i < padded_len; i++) {
    standard[i] = '=';
  }

  return push_base64_decoding(L, standard, padded_len, message,
                              sizeof(message));
}


/* crypto.constant_time_equal(a, b) -> boolean. The time taken depends on
 * the length of the strings but not on their contents. */
static int
l_constant_time_equal(lua_State *L)
{
  size_t a_len, b_len;
  const unsigned char *a = check_bytes(L, 1, &a_len);
  const unsigned char *b = check_bytes(L, 2, &b_len);

  if (a_len != b_len) {
    lua_pushboolean(L, 0);
    return 1;
  }

  lua_pushboolean(L, CRYPTO_memcmp(a, b, a_len) == 0);
  return 1;
}


/* crypto.random_bytes(n) -> n bytes from the OpenSSL CSPRNG */
static int
l_random_bytes(lua_State *L)
{
  size_t n = (size_t) check_range(L, 1, 1, JV_RANDOM_MAX);
  unsigned char *out = push_scratch(L, n);

  if (RAND_bytes(out, (int) n) != 1) {
    return push_openssl_error(L, "RAND_bytes");
  }

  lua_pushlstring(L, (const char *) out, n);
  return 1;
}


/* crypto.random_token(n) -> n characters of [A-Za-z0-9_-] */
static int
l_random_token(lua_State *L)
{
  static const char alphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  size_t n = (size_t) check_range(L, 1, 1, JV_RANDOM_MAX);
  unsigned char *out = push_scratch(L, n);
  size_t i;

  if (RAND_bytes(out, (int) n) != 1) {
    return push_openssl_error(L, "RAND_bytes");
  }

  /* 256 is a multiple of 64, so the low six bits of a uniform byte pick
   * each of the 64 characters with equal probability. */
  for (i = 0; i < n; i++) {
    out[i] = (unsigned char) alphabet[out[i] & 0x3f];
  }

  lua_pushlstring(L, (const char *) out, n);
  return 1;
}


/*
 * Password hashing (PBKDF2-HMAC-SHA256 and scrypt). Both are slow by
 * design, so a call from a coroutine that may wait runs on the libuv
 * thread pool while the loop serves other requests. A call from anywhere
 * else (the main chunk, a plain coroutine) runs in place.
 */
typedef struct {
  uv_work_t req;
  int ref; /* parked coroutine */
  int is_scrypt;
  int iterations;   /* PBKDF2 */
  uint64_t n, r, p; /* scrypt */
  const unsigned char *password;
  size_t password_len;
  const unsigned char *salt;
  size_t salt_len;
  unsigned char *out;
  size_t length;
  size_t alloc_size; /* of this job when it was malloc'd */
  int failed;
  char message[320];
} jv_kdf_job_t;


/* Runs the derivation; safe on a worker thread because it touches only the
 * job and OpenSSL's thread-local error queue. */
static void
kdf_run(jv_kdf_job_t *job)
{
  const char *call;
  int ok;

  if (job->is_scrypt) {
    call = "EVP_PBE_scrypt";
    ok = EVP_PBE_scrypt((const char *) job->password, job->password_len,
                        job->salt, job->salt_len, job->n, job->r, job->p,
                        JV_SCRYPT_MAX_MEMORY, job->out, job->length);
  } else {
    call = "PKCS5_PBKDF2_HMAC";
    ok =
        PKCS5_PBKDF2_HMAC((const char *) job->password, (int) job->password_len,
                          job->salt, (int) job->salt_len, job->iterations,
                          EVP_sha256(), (int) job->length, job->out);
  }

  if (ok != 1) {
    job->failed = 1;
    format_openssl_error(call, job->message, sizeof(job->message));
  }
}


static int
kdf_push_result(lua_State *L, const jv_kdf_job_t *job)
{
  if (job->failed) {
    lua_pushnil(L);
    lua_pushstring(L, job->message);
    lua_pushstring(L, JV_CRYPTO_ERROR);
    return 3;
  }

  lua_pushlstring(L, (const char *) job->out, job->length);
  return 1;
}


static void
kdf_work_cb(uv_work_t *req)
{
  kdf_run(req->data);
}


static void
kdf_after_work_cb(uv_work_t *req, int status)
{
  jv_kdf_job_t *job = req->data;
  int ref = job->ref;
  lua_State *co = jv__co_thread(ref);
  int nargs;

  if (status == UV_ECANCELED) {
    nargs = jv__push_error(co, JV_ECANCELED);
  } else {
    nargs = kdf_push_result(co, job);
  }

  /* The job contains a copy of the password and the derived key. */
  OPENSSL_cleanse(job, job->alloc_size);
  free(job);
  jv__co_resume(ref, nargs);
}


/* Runs job, in place or on the thread pool, and returns what the Lua
 * function returns. The job's inputs point into Lua strings at this
 * point: the thread-pool path copies them, because the strings are not
 * guaranteed to stay anchored while the coroutine waits. */
static int
kdf_start(lua_State *L, jv_kdf_job_t *job)
{
  jv_kdf_job_t *copy;
  unsigned char *p;
  size_t size;
  int rc;

  if (!jv__co_parkable(L)) {
    job->out = push_scratch(L, job->length);
    kdf_run(job);
    return kdf_push_result(L, job);
  }

  size = sizeof(*job) + job->password_len + job->salt_len + job->length;
  copy = malloc(size);
  if (copy == NULL) {
    return jv__push_error(L, JV_ENOMEM);
  }

  *copy = *job;
  copy->alloc_size = size;
  p = (unsigned char *) (copy + 1);
  memcpy(p, job->password, job->password_len);
  copy->password = p;
  p += job->password_len;
  memcpy(p, job->salt, job->salt_len);
  copy->salt = p;
  p += job->salt_len;
  copy->out = p;
  copy->req.data = copy;
  copy->ref = jv__co_park(L);

  rc = uv_queue_work(jv__loop(), &copy->req, kdf_work_cb, kdf_after_work_cb);
  if (rc != 0) {
    jv__co_forget(copy->ref);
    OPENSSL_cleanse(copy, size);
    free(copy);
    return jv__push_error(L, rc);
  }

  return lua_yield(L, 0);
}


/* crypto.pbkdf2_sha256(password, salt, iterations, length) -> raw key */
static int
l_pbkdf2_sha256(lua_State *L)
{
  jv_kdf_job_t job;

  memset(&job, 0, sizeof(job));
  job.password = check_bytes(L, 1, &job.password_len);
  job.salt = check_bytes(L, 2, &job.salt_len);
  job.iterations = (int) check_range(L, 3, 1, INT_MAX);
  job.length = (size_t) check_range(L, 4, 1, JV_KDF_MAX_LENGTH);

  luaL_argcheck(L, job.password_len <= INT_MAX, 1, "password too long");
  luaL_argcheck(L, job.salt_len <= INT_MAX, 2, "salt too long");
  return kdf_start(L, &job);
}


/* crypto.scrypt(password, salt, N, r, p, length) -> raw key */
static int
l_scrypt(lua_State *L)
{
  jv_kdf_job_t job;
  char message[160];
  uint64_t blocks;

  memset(&job, 0, sizeof(job));
  job.is_scrypt = 1;
  job.password = check_bytes(L, 1, &job.password_len);
  job.salt = check_bytes(L, 2, &job.salt_len);
  job.n = (uint64_t) check_range(L, 3, 2, INT_MAX);
  job.r = (uint64_t) check_range(L, 4, 1, INT_MAX);
  job.p = (uint64_t) check_range(L, 5, 1, INT_MAX);
  job.length = (size_t) check_range(L, 6, 1, JV_KDF_MAX_LENGTH);

  luaL_argcheck(L, (job.n & (job.n - 1)) == 0, 3, "N must be a power of 2");

  /* The same bound EVP_PBE_scrypt applies to 128 * r * (N + p + 2)
   * bytes, checked here so the error names the parameters instead of
   * coming back as a library failure. Dividing instead of multiplying
   * avoids overflow: N + p + 2 is below 2^33 but r can be up to 2^31. */
  blocks = job.n + job.p + 2;
  if (job.r > JV_SCRYPT_MAX_MEMORY / 128 / blocks) {
    snprintf(message, sizeof(message),
             "scrypt with N = %llu, r = %llu, p = %llu needs more than the "
             "limit of %llu MiB",
             (unsigned long long) job.n, (unsigned long long) job.r,
             (unsigned long long) job.p,
             (unsigned long long) (JV_SCRYPT_MAX_MEMORY >> 20));
    return luaL_error(L, "%s", message);
  }

  return kdf_start(L, &job);
}


int
jv__open_crypto(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "hmac_sha256", l_hmac_sha256 },
                                    { "sha256", l_sha256 },
                                    { "sha1", l_sha1 },
                                    { "sha256_new", l_sha256_new },
                                    { "hex_encode", l_hex_encode },
                                    { "hmac_sha256_join", l_hmac_sha256_join },
                                    { "hex_decode", l_hex_decode },
                                    { "base64_encode", l_base64_encode },
                                    { "base64_decode", l_base64_decode },
                                    { "base64url_encode", l_base64url_encode },
                                    { "base64url_decode", l_base64url_decode },
                                    { "constant_time_equal",
                                      l_constant_time_equal },
                                    { "random_bytes", l_random_bytes },
                                    { "random_token", l_random_token },
                                    { "pbkdf2_sha256", l_pbkdf2_sha256 },
                                    { "scrypt", l_scrypt },
                                    { NULL, NULL } };
  static const luaL_Reg sha256_methods[] = { { "update", l_sha256_update },
                                             { "final", l_sha256_final },
                                             { NULL, NULL } };

  luaL_newmetatable(L, JV_SHA256_MT);
  lua_newtable(L);
  luaL_setfuncs(L, sha256_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_sha256_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
