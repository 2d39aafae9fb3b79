/*
 * nonce.c: core.nonce, a replay cache with a TTL and a hard memory bound.
 *
 * A cache is one allocation made up front: a header and an open-addressing
 * table (linear probing) of 16-byte slots, sized from max_bytes and never
 * grown. A slot stores a 96-bit keyed hash of the nonce instead of the
 * nonce itself, plus its expiry in whole seconds. The hash is SipHash-2-4
 * under two random keys per cache, so a client cannot choose nonces that
 * pile up in one probe chain. With n entries stored, a new nonce matches
 * an existing fingerprint with probability about n / 2^96. Such a match
 * makes a fresh nonce look replayed, and never lets a replay through.
 *
 * At most 3/4 of the slots are used, which keeps probe chains short. Live
 * entries are never evicted: when the table is at that limit and no entry
 * has expired, check_and_add returns nil, message, "full". Expired entries
 * are reclaimed lazily (reused in place when a probe passes one), by a few
 * slots of sweep on every insert, and by a full sweep when the table is at
 * its limit (at most once per clock second, because expiries are whole
 * seconds).
 */
#include "internal.h"

#include <openssl/err.h>
#include <openssl/rand.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define JV_NONCE_MT "justavps.nonce_cache"

#define JV_NONCE_MIN_LENGTH 16
#define JV_NONCE_MAX_LENGTH 64

#define JV_NONCE_DEFAULT_TTL 120
#define JV_NONCE_MAX_TTL     86400

#define JV_NONCE_DEFAULT_MAX_BYTES ((double) (16 << 20))
#define JV_NONCE_MIN_MAX_BYTES     4096.0

/* Slot indexes are computed with a 32-bit multiply, so the table stays
 * below 2^32 slots: 4 GiB of 16-byte slots is well under that. */
#define JV_NONCE_MAX_MAX_BYTES 4294967296.0

/* Slots examined for expired entries on each insert. Two per insert visits
 * the whole table once per slot_count / 2 inserts. */
#define JV_NONCE_SWEEP_STEP 2

/* Expiries are stored as uint32 seconds, so now + ttl must stay below
 * 2^32 (the year 2106 in Unix time). */
#define JV_NONCE_MAX_NOW (4294967295.0 - JV_NONCE_MAX_TTL - 1)

typedef struct {
  uint32_t hash[3]; /* the first SipHash in [0] and [1], the second's low
                       32 bits in [2] */
  uint32_t expires; /* Unix seconds, rounded up; 0 marks an empty slot */
} jv_nonce_slot_t;

typedef struct {
  jv_nonce_slot_t *slots; /* NULL once closed */
  size_t slot_count;
  size_t max_entries; /* 3/4 of slot_count */
  size_t stored;      /* occupied slots, live or expired */
  size_t sweep_cursor;
  size_t bytes;           /* this header plus the slots */
  double last_full_sweep; /* whole second of the last full sweep */
  double ttl;
  uint64_t keys[4]; /* two SipHash-2-4 keys of 128 bits */
} jv_nonce_cache_t;


/*
 * SipHash-2-4 (Aumasson and Bernstein, 2012) with a 64-bit output. OpenSSL
 * offers SipHash only through EVP_MAC, which needs a context allocated and
 * initialised per call. This version allocates nothing and is checked
 * against OpenSSL's output by siphash_self_test().
 */
static uint64_t
rotl64(uint64_t x, int b)
{
  return (x << b) | (x >> (64 - b));
}


static uint64_t
load_le64(const unsigned char *p)
{
  uint64_t v = 0;
  int i;

  for (i = 7; i >= 0; i--) {
    v = v << 8 | p[i];
  }

  return v;
}


static void
sip_round(uint64_t v[4])
{
  v[0] += v[1];
  v[1] = rotl64(v[1], 13);
  v[1] ^= v[0];
  v[0] = rotl64(v[0], 32);
  v[2] += v[3];
  v[3] = rotl64(v[3], 16);
  v[3] ^= v[2];
  v[0] += v[3];
  v[3] = rotl64(v[3], 21);
  v[3] ^= v[0];
  v[2] += v[1];
  v[1] = rotl64(v[1], 17);
  v[1] ^= v[2];
  v[2] = rotl64(v[2], 32);
}


static uint64_t
siphash24(const uint64_t key[2], const unsigned char *data, size_t len)
{
  uint64_t v[4];
  uint64_t last = (uint64_t) len << 56;
  size_t blocks = len / 8, i;

  v[0] = 0x736f6d6570736575ULL ^ key[0];
  v[1] = 0x646f72616e646f6dULL ^ key[1];
  v[2] = 0x6c7967656e657261ULL ^ key[0];
  v[3] = 0x7465646279746573ULL ^ key[1];

  for (i = 0; i < blocks; i++) {
    uint64_t m = load_le64(data + 8 * i);

    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
  }

  for (i = 0; i < len % 8; i++) {
    last |= (uint64_t) data[8 * blocks + i] << (8 * i);
  }

  v[3] ^= last;
  sip_round(v);
  sip_round(v);
  v[0] ^= last;

  v[2] ^= 0xff;
  for (i = 0; i < 4; i++) {
    sip_round(v);
  }

  return v[0] ^ v[1] ^ v[2] ^ v[3];
}


/* Checks siphash24 with key 00..0f on the 15-byte message 00..0e, the
 * empty message and 64 'A's (full blocks, no tail). The expected values
 * came from `openssl mac -macopt hexkey:000102030405060708090a0b0c0d0e0f
 * -macopt size:8 SIPHASH` (OpenSSL 3.0.22), read as little-endian.
 * Returns 0 when all match. */
static int
siphash_self_test(void)
{
  const uint64_t key[2] = { 0x0706050403020100ULL, 0x0f0e0d0c0b0a0908ULL };
  unsigned char message[64];
  int i;

  for (i = 0; i < 15; i++) {
    message[i] = (unsigned char) i;
  }

  if (siphash24(key, message, 15) != 0xa129ca6149be45e5ULL) {
    return -1;
  }

  if (siphash24(key, message, 0) != 0x726fdb47dd0e0e31ULL) {
    return -1;
  }

  memset(message, 'A', sizeof(message));
  if (siphash24(key, message, 64) != 0x66ed995e80b60d79ULL) {
    return -1;
  }

  return 0;
}


/*
 * The table.
 */
static int
nonce_char_valid(unsigned char c)
{
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= '0' && c <= '9') || c == '_' || c == '-';
}


/* Returns 0 when nonce has the form the signatures require, or -1 with a
 * message in buf. The message leaves the nonce out because it comes from
 * the client. */
static int
nonce_validate(const unsigned char *nonce, size_t len, char *buf, size_t size)
{
  size_t i;

  if (len < JV_NONCE_MIN_LENGTH || len > JV_NONCE_MAX_LENGTH) {
    snprintf(buf, size,
             "invalid nonce: length %zu, expected %d to %d characters of "
             "[A-Za-z0-9_-]",
             len, JV_NONCE_MIN_LENGTH, JV_NONCE_MAX_LENGTH);
    return -1;
  }

  for (i = 0; i < len; i++) {
    if (!nonce_char_valid(nonce[i])) {
      snprintf(buf, size,
               "invalid nonce: character at offset %zu is not in "
               "[A-Za-z0-9_-]",
               i);
      return -1;
    }
  }

  return 0;
}


static void
nonce_fingerprint(const jv_nonce_cache_t *c, const unsigned char *nonce,
                  size_t len, jv_nonce_slot_t *out)
{
  uint64_t first = siphash24(&c->keys[0], nonce, len);
  uint64_t second = siphash24(&c->keys[2], nonce, len);

  out->hash[0] = (uint32_t) first;
  out->hash[1] = (uint32_t) (first >> 32);
  out->hash[2] = (uint32_t) second;
}


/* Returns the slot where a probe for this fingerprint starts: the high 32
 * bits of the first hash scaled to the table size, which spreads evenly
 * without a division or a power-of-two size. */
static size_t
nonce_home(const jv_nonce_cache_t *c, const jv_nonce_slot_t *slot)
{
  return (size_t) (((uint64_t) slot->hash[1] * c->slot_count) >> 32);
}


static size_t
nonce_next(const jv_nonce_cache_t *c, size_t i)
{
  return i + 1 == c->slot_count ? 0 : i + 1;
}


static int
nonce_same(const jv_nonce_slot_t *a, const jv_nonce_slot_t *b)
{
  return a->hash[0] == b->hash[0] && a->hash[1] == b->hash[1] &&
         a->hash[2] == b->hash[2];
}


static int
nonce_expired(const jv_nonce_slot_t *slot, double now)
{
  return slot->expires != 0 && (double) slot->expires <= now;
}


/* Returns non-zero when home lies in the cyclic interval (hole, j]. */
static int
nonce_between(size_t hole, size_t home, size_t j)
{
  if (hole <= j) {
    return hole < home && home <= j;
  }

  return home > hole || home <= j;
}


/*
 * Empties slot hole by backward-shift deletion: each later entry of the
 * same cluster that may sit earlier (its home is not between the hole and
 * its slot) moves into the hole, and the hole moves to where it was. No
 * tombstones are left, so probe chains never outgrow the stored entries.
 * Moved entries land at or after the starting hole and never cross an
 * empty slot.
 */
static void
nonce_delete_at(jv_nonce_cache_t *c, size_t hole)
{
  size_t j = hole;

  for (;;) {
    jv_nonce_slot_t *slot;

    j = nonce_next(c, j);
    slot = &c->slots[j];

    if (slot->expires == 0) {
      break;
    }

    if (nonce_between(hole, nonce_home(c, slot), j)) {
      continue;
    }

    c->slots[hole] = *slot;
    hole = j;
  }

  memset(&c->slots[hole], 0, sizeof(c->slots[hole]));
  c->stored--;
}


/* Examines a few slots at the sweep cursor, so expired entries drain
 * steadily instead of all at once when the table reaches its limit. */
static void
nonce_sweep_step(jv_nonce_cache_t *c, double now)
{
  int k;

  for (k = 0; k < JV_NONCE_SWEEP_STEP; k++) {
    if (nonce_expired(&c->slots[c->sweep_cursor], now)) {
      /* Another entry may move into this slot, so look at it again. */
      nonce_delete_at(c, c->sweep_cursor);
    } else {
      c->sweep_cursor = nonce_next(c, c->sweep_cursor);
    }
  }
}


/* Drops every entry expired at now and returns how many. The scan starts
 * after an empty slot, so no cluster wraps past its start and every entry
 * that a deletion moves lands at or after the scan position. */
static size_t
nonce_sweep(jv_nonce_cache_t *c, double now)
{
  size_t start = 0, dropped = 0, n, i;

  while (c->slots[start].expires != 0) {
    start++;
  }

  i = start;
  for (n = 0; n < c->slot_count; n++) {
    i = nonce_next(c, i);

    while (nonce_expired(&c->slots[i], now)) {
      nonce_delete_at(c, i);
      dropped++;
    }
  }

  c->last_full_sweep = floor(now);
  return dropped;
}


/* Returns the slot holding a live or expired entry for fp, or SIZE_MAX.
 * When reuse is not NULL, it receives the first expired slot passed on the
 * way (or SIZE_MAX), where a new entry for fp may go. */
static size_t
nonce_find(const jv_nonce_cache_t *c, const jv_nonce_slot_t *fp, double now,
           size_t *reuse, size_t *empty)
{
  size_t i = nonce_home(c, fp);

  if (reuse != NULL) {
    *reuse = SIZE_MAX;
  }

  for (;;) {
    const jv_nonce_slot_t *slot = &c->slots[i];

    if (slot->expires == 0) {
      *empty = i;
      return SIZE_MAX;
    }

    if (nonce_same(slot, fp)) {
      return i;
    }

    if (reuse != NULL && *reuse == SIZE_MAX && nonce_expired(slot, now)) {
      *reuse = i;
    }

    i = nonce_next(c, i);
  }
}


typedef enum {
  JV_NONCE_ADDED,
  JV_NONCE_REPLAYED,
  JV_NONCE_FULL,
} jv_nonce_result_t;


static jv_nonce_result_t
nonce_check_and_add(jv_nonce_cache_t *c, const unsigned char *nonce, size_t len,
                    double now)
{
  jv_nonce_slot_t fp;
  size_t found, reuse, empty = 0;
  uint32_t expires = (uint32_t) ceil(now + c->ttl);

  nonce_fingerprint(c, nonce, len, &fp);
  fp.expires = expires;
  nonce_sweep_step(c, now);

  if (c->stored >= c->max_entries && floor(now) > c->last_full_sweep) {
    nonce_sweep(c, now);
  }

  found = nonce_find(c, &fp, now, &reuse, &empty);

  if (found != SIZE_MAX) {
    if (!nonce_expired(&c->slots[found], now)) {
      return JV_NONCE_REPLAYED;
    }

    c->slots[found].expires = expires;
    return JV_NONCE_ADDED;
  }

  /* Overwriting an expired entry keeps the slot occupied, so no other
   * entry's probe chain breaks and the count of stored entries stays. */
  if (reuse != SIZE_MAX) {
    c->slots[reuse] = fp;
    return JV_NONCE_ADDED;
  }

  if (c->stored >= c->max_entries) {
    return JV_NONCE_FULL;
  }

  c->slots[empty] = fp;
  c->stored++;
  return JV_NONCE_ADDED;
}


void *
jv__nonce_cache(lua_State *L, int idx)
{
  return luaL_checkudata(L, idx, JV_NONCE_MT);
}


int
jv__nonce_add(void *cache, const char *nonce, size_t len)
{
  jv_nonce_cache_t *c = cache;
  struct timespec ts;
  char message[8];

  if (c->slots == NULL || nonce_validate((const unsigned char *) nonce, len,
                                         message, sizeof(message)) != 0) {
    return -1;
  }

  clock_gettime(CLOCK_REALTIME, &ts);
  switch (nonce_check_and_add(c, (const unsigned char *) nonce, len,
                              (double) ts.tv_sec + (double) ts.tv_nsec / 1e9)) {
  case JV_NONCE_ADDED:
    return 0;
  case JV_NONCE_REPLAYED:
    return 1;
  default:
    return 2;
  }
}


/*
 * Lua bindings.
 */
static jv_nonce_cache_t *
check_cache(lua_State *L)
{
  jv_nonce_cache_t *c = luaL_checkudata(L, 1, JV_NONCE_MT);

  if (c->slots == NULL) {
    luaL_error(L, "nonce cache is closed");
  }

  return c;
}


/* Returns the time argument at idx, or the wall clock when it is absent. */
static double
check_now(lua_State *L, int idx)
{
  struct timespec ts;
  double now;

  if (lua_isnoneornil(L, idx)) {
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
  }

  now = luaL_checknumber(L, idx);
  luaL_argcheck(L, now >= 0 && now <= JV_NONCE_MAX_NOW, idx,
                "now must be Unix seconds from 0 to 2^32 - 86402");
  return now;
}


/* Checks the nonce argument: a non-string raises, a malformed string
 * returns non-zero after pushing nil, message, "invalid". */
static int
check_nonce(lua_State *L, const unsigned char **nonce, size_t *len)
{
  char message[128];

  luaL_checktype(L, 2, LUA_TSTRING);
  *nonce = (const unsigned char *) lua_tolstring(L, 2, len);

  if (nonce_validate(*nonce, *len, message, sizeof(message)) != 0) {
    jv__push_error_msg(L, JV_EINVALID, message);
    return -1;
  }

  return 0;
}


/* cache:check_and_add(nonce [, now]) -> true | false, "replayed" |
 * nil, message, "full" | nil, message, "invalid" */
static int
l_check_and_add(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);
  double now = check_now(L, 3);
  const unsigned char *nonce;
  char message[160];
  size_t len;

  if (check_nonce(L, &nonce, &len) != 0) {
    return 3;
  }

  switch (nonce_check_and_add(c, nonce, len, now)) {
  case JV_NONCE_ADDED:
    lua_pushboolean(L, 1);
    return 1;

  case JV_NONCE_REPLAYED:
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "replayed");
    return 2;

  case JV_NONCE_FULL:
  default:
    snprintf(message, sizeof(message),
             "nonce cache is full: %zu entries in %zu bytes; retry after "
             "the oldest expire or raise max_bytes",
             c->stored, c->bytes);
    return jv__push_error_msg(L, JV_EFULL, message);
  }
}


/* cache:seen(nonce [, now]) -> boolean, or nil, message, "invalid" */
static int
l_seen(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);
  double now = check_now(L, 3);
  const unsigned char *nonce;
  jv_nonce_slot_t fp;
  size_t found, empty, len;

  if (check_nonce(L, &nonce, &len) != 0) {
    return 3;
  }

  nonce_fingerprint(c, nonce, len, &fp);
  found = nonce_find(c, &fp, now, NULL, &empty);
  lua_pushboolean(L,
                  found != SIZE_MAX && !nonce_expired(&c->slots[found], now));
  return 1;
}


/* cache:sweep([now]) -> number of expired entries dropped */
static int
l_sweep(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);
  double now = check_now(L, 2);

  lua_pushnumber(L, (lua_Number) nonce_sweep(c, now));
  return 1;
}


/* cache:count() -> entries stored, including expired ones not yet
 * reclaimed */
static int
l_count(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);

  lua_pushnumber(L, (lua_Number) c->stored);
  return 1;
}


/* cache:capacity() -> the maximum number of entries */
static int
l_capacity(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);

  lua_pushnumber(L, (lua_Number) c->max_entries);
  return 1;
}


/* cache:bytes() -> bytes allocated: the header and the whole table, which
 * is allocated up front */
static int
l_bytes(lua_State *L)
{
  jv_nonce_cache_t *c = check_cache(L);

  lua_pushnumber(L, (lua_Number) c->bytes);
  return 1;
}


/* cache:close(): frees the table. Safe to call twice; every other method
 * raises afterwards. */
static int
l_close(lua_State *L)
{
  jv_nonce_cache_t *c = luaL_checkudata(L, 1, JV_NONCE_MT);

  free(c->slots);
  c->slots = NULL;
  c->bytes = 0;
  return 0;
}


/* Reads options.name as a number, or returns fallback when it is nil. */
static double
option_number(lua_State *L, const char *name, double fallback)
{
  double value;

  lua_getfield(L, 1, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return fallback;
  }

  if (lua_type(L, -1) != LUA_TNUMBER) {
    luaL_error(L, "bad option '%s' to nonce.new: number expected, got %s", name,
               luaL_typename(L, -1));
  }

  value = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return value;
}


/* Raises on a key other than ttl and max_bytes, so a misspelt option does
 * not silently fall back to its default. */
static void
check_option_names(lua_State *L)
{
  lua_pushnil(L);
  while (lua_next(L, 1) != 0) {
    const char *key =
        lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;

    if (key == NULL ||
        (strcmp(key, "ttl") != 0 && strcmp(key, "max_bytes") != 0)) {
      luaL_error(L,
                 "bad option to nonce.new: unknown key %s (expected "
                 "ttl or max_bytes)",
                 key ? key : luaL_typename(L, -2));
    }

    lua_pop(L, 1);
  }
}


/* nonce.new{ttl = seconds, max_bytes = n} -> cache, or nil, message, code
 * when the table cannot be allocated or the keys cannot be drawn */
static int
l_new(lua_State *L)
{
  double ttl = JV_NONCE_DEFAULT_TTL;
  double max_bytes = JV_NONCE_DEFAULT_MAX_BYTES;
  jv_nonce_cache_t *c;
  char message[320];
  size_t slot_count;

  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    check_option_names(L);
    ttl = option_number(L, "ttl", ttl);
    max_bytes = option_number(L, "max_bytes", max_bytes);
  }

  if (!(ttl > 0 && ttl <= JV_NONCE_MAX_TTL)) {
    return luaL_error(L,
                      "bad option 'ttl' to nonce.new: must be seconds "
                      "above 0 and at most %d",
                      JV_NONCE_MAX_TTL);
  }

  if (!(max_bytes >= JV_NONCE_MIN_MAX_BYTES &&
        max_bytes <= JV_NONCE_MAX_MAX_BYTES) ||
      max_bytes != floor(max_bytes)) {
    return luaL_error(L, "bad option 'max_bytes' to nonce.new: must be a "
                         "whole number of bytes from 4096 to 2^32");
  }

  if (siphash_self_test() != 0) {
    return luaL_error(L, "nonce.new: SipHash self-test failed, the core "
                         "was miscompiled for this platform");
  }

  c = lua_newuserdata(L, sizeof(*c));
  memset(c, 0, sizeof(*c));
  luaL_getmetatable(L, JV_NONCE_MT);
  lua_setmetatable(L, -2);

  slot_count = ((size_t) max_bytes - sizeof(*c)) / sizeof(jv_nonce_slot_t);
  c->slot_count = slot_count;
  c->max_entries = slot_count / 4 * 3;
  c->bytes = sizeof(*c) + slot_count * sizeof(jv_nonce_slot_t);
  c->ttl = ttl;
  c->last_full_sweep = -1;

  if (RAND_bytes((unsigned char *) c->keys, sizeof(c->keys)) != 1) {
    unsigned long e = ERR_peek_last_error();
    char reason[256];

    jv__openssl_reason(e, reason, sizeof(reason));
    ERR_clear_error();
    snprintf(message, sizeof(message), "RAND_bytes failed: %s", reason);
    lua_pushnil(L);
    lua_pushstring(L, message);
    lua_pushliteral(L, "crypto_error");
    return 3;
  }

  /* calloc returns zeroed slots, which are empty. */
  c->slots = calloc(slot_count, sizeof(jv_nonce_slot_t));
  if (c->slots == NULL) {
    snprintf(message, sizeof(message),
             "out of memory allocating %zu bytes for the nonce cache",
             c->bytes);
    return jv__push_error_msg(L, JV_ENOMEM, message);
  }

  return 1;
}


int
jv__open_nonce(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "new", l_new }, { NULL, NULL } };
  static const luaL_Reg methods[] = { { "check_and_add", l_check_and_add },
                                      { "seen", l_seen },
                                      { "sweep", l_sweep },
                                      { "count", l_count },
                                      { "capacity", l_capacity },
                                      { "bytes", l_bytes },
                                      { "close", l_close },
                                      { NULL, NULL } };

  luaL_newmetatable(L, JV_NONCE_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_close);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
