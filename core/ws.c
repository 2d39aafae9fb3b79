/*
 * ws.c: core.ws, the WebSocket protocol of RFC 6455 in C.
 *
 * This file contains the mechanisms: the opening handshake (accept key,
 * request checks, the 101 response, the client's request and the check of
 * the server's response), frame encoding with masking, and an incremental
 * frame parser that assembles messages, validates UTF-8 and enforces the
 * protocol's rules and size limits. Lua drives the socket:
 * lua/justavps/websocket.lua combines these functions with core.tcp
 * sockets into a connection object, because a C function cannot continue
 * after it yields under LuaJIT. core.ws.pipe lives in pipe.c.
 *
 * Misuse (a wrong type, an invalid close code to send) raises a Lua error.
 * An expected failure returns nil, message, code with a stable code.
 */
#include "internal.h"
#include "ws_pipe.h"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define JV_WS_PARSER_MT "justavps.ws.parser"

/* Appended to the client's key before hashing (RFC 6455, section 1.3). */
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

/* Default limit on an assembled message: large enough for file chunks and
 * terminal bursts, small enough that one peer cannot exhaust memory. */
#define WS_DEFAULT_MAX_MESSAGE (16 * 1024 * 1024)

/* A message buffer larger than this is freed after each message instead
 * of being kept for the next one. */
#define WS_KEEP_BUFFER (64 * 1024)

/* Bounds the client's response head: a 101 carries a few headers only. */
#define WS_MAX_RESPONSE_HEAD 16384

/* Close payloads carry a 2-byte code, so a reason fits in 123 bytes. */
#define WS_MAX_CONTROL 125
#define WS_MAX_REASON  (WS_MAX_CONTROL - 2)

enum {
  WS_OP_CONTINUATION = 0x0,
  WS_OP_TEXT = 0x1,
  WS_OP_BINARY = 0x2,
  WS_OP_CLOSE = 0x8,
  WS_OP_PING = 0x9,
  WS_OP_PONG = 0xA,
};

/* Close codes sent on a violation (RFC 6455, section 7.4.1). */
enum {
  WS_CLOSE_PROTOCOL = 1002,
  WS_CLOSE_INVALID_PAYLOAD = 1007,
  WS_CLOSE_TOO_BIG = 1009,
};

static const char *const kind_names[] = {
  "continuation", "text", "binary", "close", "ping", "pong", NULL
};

static const int kind_opcodes[] = { WS_OP_CONTINUATION, WS_OP_TEXT,
                                    WS_OP_BINARY,       WS_OP_CLOSE,
                                    WS_OP_PING,         WS_OP_PONG };


static const char *
opcode_name(int opcode)
{
  size_t i;

  for (i = 0; i < JV_ARRAY_SIZE(kind_opcodes); i++) {
    if (kind_opcodes[i] == opcode) {
      return kind_names[i];
    }
  }

  return "unknown";
}


/*
 * Returns non-zero for a close code an endpoint may put on the wire:
 * 1000-1003 and 1007-1011 from RFC 6455, 1012-1014 registered with IANA
 * since (service restart, try again later, bad gateway), and 3000-4999 for
 * libraries and applications. 1004, 1005, 1006 and 1015 are reserved and
 * never sent.
 */
static int
close_code_valid(lua_Integer code)
{
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}


/* ---- UTF-8 ---- */

/*
 * An incremental UTF-8 validator (RFC 3629): it rejects overlong forms,
 * surrogates and code points above U+10FFFF, and carries its state across
 * calls so a character split between frames is checked as one.
 */
typedef struct {
  unsigned char need;   /* continuation bytes still expected */
  unsigned char lo, hi; /* range allowed for the next byte */
} jv_utf8_t;


static void
utf8_reset(jv_utf8_t *u)
{
  u->need = 0;
  u->lo = 0x80;
  u->hi = 0xBF;
}


static int
utf8_lead(jv_utf8_t *u, unsigned char c)
{
  u->lo = 0x80;
  u->hi = 0xBF;

  if (c >= 0xC2 && c <= 0xDF) {
    u->need = 1;
  } else if (c == 0xE0) {
    u->need = 2;
    u->lo = 0xA0; /* rejects overlong 3-byte forms */
  } else if (c == 0xED) {
    u->need = 2;
    u->hi = 0x9F; /* rejects surrogates U+D800-U+DFFF */
  } else if (c >= 0xE1 && c <= 0xEF) {
    u->need = 2;
  } else if (c == 0xF0) {
    u->need = 3;
    u->lo = 0x90; /* rejects overlong 4-byte forms */
  } else if (c >= 0xF1 && c <= 0xF3) {
    u->need = 3;
  } else if (c == 0xF4) {
    u->need = 3;
    u->hi = 0x8F; /* rejects code points above U+10FFFF */
  } else {
    return -1;
  }

  return 0;
}


/* Returns 0 while the bytes so far may still form valid UTF-8, -1 once
 * they cannot. */
static int
utf8_feed(jv_utf8_t *u, const unsigned char *p, size_t n)
{
  size_t i = 0;

  while (i < n) {
    unsigned char c;

    if (u->need == 0) {
      /* Skip ASCII eight bytes at a time: most text is ASCII. */
      while (i + 8 <= n) {
        uint64_t w;

        memcpy(&w, p + i, 8);
        if (w & UINT64_C(0x8080808080808080)) {
          break;
        }
        i += 8;
      }

      if (i == n) {
        break;
      }

      c = p[i++];
      if (c < 0x80) {
        continue;
      }

      if (utf8_lead(u, c) != 0) {
        return -1;
      }
      continue;
    }

    c = p[i++];
    if (c < u->lo || c > u->hi) {
      return -1;
    }

    u->need--;
    u->lo = 0x80;
    u->hi = 0xBF;
  }

  return 0;
}


static int
utf8_valid(const char *p, size_t n)
{
  jv_utf8_t u;

  utf8_reset(&u);
  return utf8_feed(&u, (const unsigned char *) p, n) == 0 && u.need == 0;
}


/* ws.valid_utf8(s): true when s is complete, valid UTF-8. */
static int
l_valid_utf8(lua_State *L)
{
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);

  lua_pushboolean(L, utf8_valid(s, len));
  return 1;
}


/* ws.valid_close_code(code): true when code may be sent in a close frame. */
static int
l_valid_close_code(lua_State *L)
{
  lua_pushboolean(L, close_code_valid(luaL_checkinteger(L, 1)));
  return 1;
}


/* ---- masking ---- */

/* XORs n bytes from src into dst with the 4-byte key, starting at byte pos
 * of the key's cycle. dst may equal src. */
static void
mask_copy(unsigned char *dst, const unsigned char *src, size_t n,
          const unsigned char key[4], uint64_t pos)
{
  unsigned char k[8];
  uint64_t m, w;
  size_t i = 0;
  int j;

  /* Rotate the key so k[0] applies to dst[0]; 8-byte blocks keep that
   * alignment because 8 is a multiple of 4. */
  for (j = 0; j < 8; j++) {
    k[j] = key[(pos + (uint64_t) j) & 3];
  }
  memcpy(&m, k, 8);

  for (; i + 8 <= n; i += 8) {
    memcpy(&w, src + i, 8);
    w ^= m;
    memcpy(dst + i, &w, 8);
  }

  for (; i < n; i++) {
    dst[i] = src[i] ^ k[i & 3];
  }
}


/* ---- handshake ---- */

/* Writes base64(SHA-1(key .. GUID)) and a terminating NUL into out, which
 * has room for at least 29 bytes. Returns 0, or -1 when OpenSSL fails. */
static int
compute_accept(const char *key, size_t len, char out[29])
{
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int dlen = 0;
  EVP_MD_CTX *ctx;
  int ok;

  ctx = EVP_MD_CTX_new();
  if (ctx == NULL) {
    ERR_clear_error();
    return -1;
  }

  ok = EVP_DigestInit_ex(ctx, EVP_sha1(), NULL) == 1 &&
       EVP_DigestUpdate(ctx, key, len) == 1 &&
       EVP_DigestUpdate(ctx, WS_GUID, sizeof(WS_GUID) - 1) == 1 &&
       EVP_DigestFinal_ex(ctx, digest, &dlen) == 1 && dlen == 20;
  EVP_MD_CTX_free(ctx);

  if (!ok) {
    ERR_clear_error();
    return -1;
  }

  EVP_EncodeBlock((unsigned char *) out, digest, 20);
  return 0;
}


/* ws.accept_key(key): the Sec-WebSocket-Accept value for a client key. */
static int
l_accept_key(lua_State *L)
{
  size_t len;
  const char *key = luaL_checklstring(L, 1, &len);
  char accept[29];

  if (compute_accept(key, len, accept) != 0) {
    return luaL_error(L, "SHA-1 through OpenSSL EVP_Digest* failed");
  }

  lua_pushstring(L, accept);
  return 1;
}


/* Writes a fresh Sec-WebSocket-Key (base64 of 16 random bytes, 24
 * characters) and a NUL into out. */
static int
make_client_key(char out[25])
{
  unsigned char nonce[16];

  if (RAND_bytes(nonce, sizeof(nonce)) != 1) {
    ERR_clear_error();
    return -1;
  }

  EVP_EncodeBlock((unsigned char *) out, nonce, sizeof(nonce));
  return 0;
}


/* Returns non-zero when the comma-separated list value contains token,
 * compared without case. */
static int
list_has_token(const char *value, const char *token)
{
  size_t tlen = strlen(token);
  const char *p = value;

  while (*p != '\0') {
    const char *start, *end;

    while (*p == ' ' || *p == '\t' || *p == ',') {
      p++;
    }

    start = p;
    while (*p != '\0' && *p != ',') {
      p++;
    }

    end = p;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t')) {
      end--;
    }

    if ((size_t) (end - start) == tlen &&
        strncasecmp(start, token, tlen) == 0) {
      return 1;
    }
  }

  return 0;
}


/* Pushes the value of the first key of the table at hidx that equals name
 * without case, or nil: the table may keep the client's spelling. */
static void
push_header_scan(lua_State *L, int hidx, const char *name)
{
  lua_pushnil(L);

  while (lua_next(L, hidx) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING &&
        strcasecmp(lua_tostring(L, -2), name) == 0) {
      lua_remove(L, -2);
      return;
    }
    lua_pop(L, 1);
  }

  lua_pushnil(L);
}


/* Replaces the array of strings on top of the stack with its values
 * joined by ", ", the form of a repeated header. */
static void
join_values(lua_State *L, const char *name)
{
  int tidx = lua_gettop(L);
  int n = (int) lua_objlen(L, tidx);
  int k;

  luaL_checkstack(L, 2 * n + 1, "too many header values");

  for (k = 1; k <= n; k++) {
    if (k > 1) {
      lua_pushliteral(L, ", ");
    }
    lua_rawgeti(L, tidx, k);
    if (lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L, "header %s: values must be strings", name);
    }
  }

  lua_concat(L, n > 0 ? 2 * n - 1 : 0);
  lua_replace(L, tidx);
}


/*
 * Pushes the value of header name from the headers at index hidx and
 * returns it, or pushes nil and returns NULL. headers is a table keyed by
 * header name in any case, whose values are strings or arrays of strings
 * (joined with ", " as repeated headers are), or a function(name) that
 * returns the value, such as a request's header method.
 */
static const char *
push_header(lua_State *L, int hidx, const char *name)
{
  char lower[64];
  size_t i;

  if (lua_isfunction(L, hidx)) {
    lua_pushvalue(L, hidx);
    lua_pushstring(L, name);
    lua_call(L, 1, 1);

  } else {
    for (i = 0; name[i] != '\0' && i + 1 < sizeof(lower); i++) {
      char c = name[i];

      lower[i] = (char) (c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    lower[i] = '\0';

    lua_getfield(L, hidx, lower);
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      push_header_scan(L, hidx, name);
    }
  }

  if (lua_istable(L, -1)) {
    join_values(L, name);
  }

  if (lua_isnil(L, -1)) {
    return NULL;
  }

  if (lua_type(L, -1) != LUA_TSTRING) {
    luaL_error(L, "header %s: value must be a string", name);
  }

  return lua_tostring(L, -1);
}


static int
push_reject(lua_State *L, const char *message, const char *code, int status)
{
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, code);
  lua_pushinteger(L, status);
  return 4;
}


/* Returns non-zero when key is the base64 form of exactly 16 bytes. */
static int
client_key_valid(const char *key, size_t len)
{
  unsigned char raw[18];

  if (len != 24 || key[22] != '=' || key[23] != '=') {
    return 0;
  }

  /* EVP_DecodeBlock rejects characters outside the base64 alphabet and
   * returns 18 for 24 characters, padding bytes included. */
  if (EVP_DecodeBlock(raw, (const unsigned char *) key, 24) != 18) {
    ERR_clear_error();
    return 0;
  }

  return 1;
}


/*
 * ws.check_request(method, headers): checks a client's opening handshake
 * (RFC 6455, section 4.2.1). Returns true, key on success, or nil,
 * message, code, status where status is the HTTP status to send (426
 * comes with a Sec-WebSocket-Version: 13 header).
 */
static int
l_check_request(lua_State *L)
{
  const char *method = luaL_checkstring(L, 1);
  const char *value;
  size_t len;

  if (!lua_istable(L, 2) && !lua_isfunction(L, 2)) {
    return luaL_argerror(L, 2, "expected a table or a function(name)");
  }

  lua_settop(L, 2);

  if (strcmp(method, "GET") != 0) {
    return push_reject(L, "WebSocket upgrade requires the GET method",
                       "bad_method", 400);
  }

  value = push_header(L, 2, "Upgrade");
  if (value == NULL || !list_has_token(value, "websocket")) {
    return push_reject(L, "Upgrade header must contain websocket",
                       "bad_upgrade", 400);
  }
  lua_pop(L, 1);

  value = push_header(L, 2, "Connection");
  if (value == NULL || !list_has_token(value, "upgrade")) {
    return push_reject(L, "Connection header must contain upgrade",
                       "bad_upgrade", 400);
  }
  lua_pop(L, 1);

  value = push_header(L, 2, "Sec-WebSocket-Version");
  if (value == NULL || strcmp(value, "13") != 0) {
    return push_reject(L, "Sec-WebSocket-Version must be 13",
                       "unsupported_version", 426);
  }
  lua_pop(L, 1);

  value = push_header(L, 2, "Sec-WebSocket-Key");
  len = value != NULL ? lua_objlen(L, -1) : 0;
  if (value == NULL || !client_key_valid(value, len)) {
    return push_reject(L,
                       "Sec-WebSocket-Key must be the base64 form of "
                       "16 bytes",
                       "bad_key", 400);
  }

  lua_pushboolean(L, 1);
  lua_insert(L, -2);
  return 2;
}


/* Raises unless s is a header name token (RFC 9110, section 5.6.2). */
static void
check_header_name(lua_State *L, const char *s)
{
  static const char extra[] = "!#$%&'*+-.^_`|~";
  const char *p;

  if (*s == '\0') {
    luaL_error(L, "header name must not be empty");
  }

  for (p = s; *p != '\0'; p++) {
    unsigned char c = (unsigned char) *p;

    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || strchr(extra, c) != NULL)) {
      luaL_error(L, "invalid header name: %s", s);
    }
  }
}


/* Raises when s contains CR, LF or NUL, which would split the head. */
static void
check_header_value(lua_State *L, const char *what, const char *s, size_t len)
{
  size_t i;

  for (i = 0; i < len; i++) {
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0') {
      luaL_error(L, "%s must not contain CR, LF or NUL", what);
    }
  }
}


/* Pushes "Name: value\r\n" lines for the table at idx (a map of names to
 * strings) as one string, or "" when idx is nil. */
static void
push_extra_headers(lua_State *L, int idx)
{
  int n = 0;

  if (lua_isnoneornil(L, idx)) {
    lua_pushliteral(L, "");
    return;
  }

  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);

  while (lua_next(L, idx) != 0) {
    const char *name, *value;
    size_t vlen;

    if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L, "headers must map names to string values");
    }

    name = lua_tostring(L, -2);
    value = lua_tolstring(L, -1, &vlen);
    check_header_name(L, name);
    check_header_value(L, name, value, vlen);

    /* Keep each line below the key that lua_next needs next. */
    luaL_checkstack(L, 3, "too many headers");
    lua_pushfstring(L, "%s: %s\r\n", name, value);
    lua_insert(L, -3);
    lua_pop(L, 1);
    n++;
  }

  lua_concat(L, n);
}


/*
 * ws.server_handshake(sock, key [, headers]): writes the 101 response that
 * completes the server side of the handshake for the client's key, plus
 * any extra headers (a map of names to strings). The response is small,
 * so it is queued at once without waiting. Returns true or nil, message,
 * code when the write fails.
 */
static int
l_server_handshake(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  size_t klen, rlen;
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *response;
  char accept[29];
  uv_buf_t buf;
  int rc;

  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
  }
  lua_settop(L, 3);

  if (compute_accept(key, klen, accept) != 0) {
    return luaL_error(L, "SHA-1 through OpenSSL EVP_Digest* failed");
  }

  push_extra_headers(L, 3);

  lua_pushfstring(L,
                  "HTTP/1.1 101 Switching Protocols\r\n"
                  "Upgrade: websocket\r\n"
                  "Connection: Upgrade\r\n"
                  "Sec-WebSocket-Accept: %s\r\n"
                  "%s\r\n",
                  accept, lua_tostring(L, -1));
  response = lua_tolstring(L, -1, &rlen);

  buf = uv_buf_init((char *) response, (unsigned int) rlen);
  rc = jv_stream_write(jv__sock_stream(sock), &buf, 1);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * ws.client_request{host=, path=, origin=, headers=}: builds the client's
 * opening handshake with a fresh random key. Returns the request text and
 * the key, which check_response needs.
 */
static int
l_client_request(lua_State *L)
{
  const char *host, *path, *origin;
  size_t len;
  char key[25];

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);

  lua_getfield(L, 1, "host");
  host = luaL_checklstring(L, -1, &len);
  luaL_argcheck(L, len > 0, 1, "host must not be empty");
  check_header_value(L, "host", host, len);

  lua_getfield(L, 1, "path");
  path = luaL_optlstring(L, -1, "/", &len);
  luaL_argcheck(L, path[0] == '/', 1, "path must start with /");
  check_header_value(L, "path", path, len);
  luaL_argcheck(L, strpbrk(path, " \t") == NULL, 1,
                "path must not contain spaces");

  lua_getfield(L, 1, "origin");
  origin = luaL_optlstring(L, -1, NULL, &len);
  if (origin != NULL) {
    check_header_value(L, "origin", origin, len);
  }

  lua_getfield(L, 1, "headers"); /* index 5 */

  if (make_client_key(key) != 0) {
    return luaL_error(L, "RAND_bytes failed");
  }

  push_extra_headers(L, 5);

  lua_pushfstring(L,
                  "GET %s HTTP/1.1\r\n"
                  "Host: %s\r\n"
                  "Upgrade: websocket\r\n"
                  "Connection: Upgrade\r\n"
                  "Sec-WebSocket-Key: %s\r\n"
                  "Sec-WebSocket-Version: 13\r\n"
                  "%s%s%s"
                  "%s\r\n",
                  path, host, key, origin ? "Origin: " : "",
                  origin ? origin : "", origin ? "\r\n" : "",
                  lua_tostring(L, -1));
  lua_pushstring(L, key);
  return 2;
}


/*
 * Parses the response head (status line and header lines, without the
 * final blank line) into a table of lower-case names on top of the stack.
 * Returns the status code, or -1 when the status line is malformed.
 */
static int
parse_response_head(lua_State *L, const char *head, size_t len)
{
  const char *end = head + len;
  const char *line = head, *eol;
  int status = -1;

  lua_newtable(L);

  while (line < end) {
    const char *colon, *v, *vend;
    char name[64];
    size_t nlen, i;

    eol = memchr(line, '\n', (size_t) (end - line));
    if (eol == NULL) {
      eol = end;
    }

    vend = eol > line && eol[-1] == '\r' ? eol - 1 : eol;

    if (line == head) {
      /* "HTTP/1.1 101 Switching Protocols" */
      if (vend - line >= 12 && memcmp(line, "HTTP/1.1 ", 9) == 0 &&
          line[9] >= '1' && line[9] <= '5' && line[10] >= '0' &&
          line[10] <= '9' && line[11] >= '0' && line[11] <= '9' &&
          (vend - line == 12 || line[12] == ' ')) {
        status =
            (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
      }

    } else {
      colon = memchr(line, ':', (size_t) (vend - line));
      nlen = colon ? (size_t) (colon - line) : 0;

      if (colon != NULL && nlen > 0 && nlen < sizeof(name)) {
        for (i = 0; i < nlen; i++) {
          char c = line[i];

          name[i] = (char) (c >= 'A' && c <= 'Z' ? c + 32 : c);
        }

        v = colon + 1;
        while (v < vend && (*v == ' ' || *v == '\t')) {
          v++;
        }
        while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t')) {
          vend--;
        }

        /* Repeated headers join with ", " as HTTP lists do. */
        lua_pushlstring(L, name, nlen);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
          lua_pop(L, 1);
          lua_pushlstring(L, v, (size_t) (vend - v));
        } else {
          lua_pushliteral(L, ", ");
          lua_pushlstring(L, v, (size_t) (vend - v));
          lua_concat(L, 3);
        }
        lua_rawset(L, -3);
      }
    }

    line = eol + 1;
  }

  return status;
}


/*
 * ws.check_response(head, key): checks the server's handshake response
 * (the head as readuntil("\r\n\r\n") returns it) against the client's key.
 * Returns true, headers (lower-case names) or nil, message, code, status.
 */
static int
l_check_response(lua_State *L)
{
  size_t hlen, klen;
  const char *head = luaL_checklstring(L, 1, &hlen);
  const char *key = luaL_checklstring(L, 2, &klen);
  const char *value;
  char accept[29];
  int status;

  lua_settop(L, 2);
  status = parse_response_head(L, head, hlen); /* headers at index 3 */

  if (status < 0) {
    return push_reject(L, "malformed status line in the handshake response",
                       "bad_status", 0);
  }

  if (status != 101) {
    lua_pushnil(L);
    lua_pushfstring(L, "server returned status %d instead of 101", status);
    lua_pushliteral(L, "bad_status");
    lua_pushinteger(L, status);
    return 4;
  }

  value = push_header(L, 3, "upgrade");
  if (value == NULL || !list_has_token(value, "websocket")) {
    return push_reject(L, "response Upgrade header must contain websocket",
                       "bad_upgrade", status);
  }
  lua_pop(L, 1);

  value = push_header(L, 3, "connection");
  if (value == NULL || !list_has_token(value, "upgrade")) {
    return push_reject(L, "response Connection header must contain upgrade",
                       "bad_upgrade", status);
  }
  lua_pop(L, 1);

  if (compute_accept(key, klen, accept) != 0) {
    return luaL_error(L, "SHA-1 through OpenSSL EVP_Digest* failed");
  }

  value = push_header(L, 3, "sec-websocket-accept");
  if (value == NULL || strcmp(value, accept) != 0) {
    return push_reject(L, "Sec-WebSocket-Accept does not match the key",
                       "bad_accept", status);
  }
  lua_pop(L, 1);

  /* The client offers no extension and no subprotocol, so the server may
   * not select one (RFC 6455, section 4.1). */
  value = push_header(L, 3, "sec-websocket-extensions");
  if (value != NULL) {
    return push_reject(L,
                       "server selected an extension the client did "
                       "not offer",
                       "bad_extension", status);
  }
  lua_pop(L, 1);

  value = push_header(L, 3, "sec-websocket-protocol");
  if (value != NULL) {
    return push_reject(L,
                       "server selected a subprotocol the client did "
                       "not offer",
                       "bad_extension", status);
  }
  lua_pop(L, 1);

  lua_pushboolean(L, 1);
  lua_insert(L, 3);
  return 2;
}


/* ---- encoding ---- */

/* Writes a frame header into h (at least 14 bytes) and returns its length.
 * key is NULL for an unmasked frame. */
static size_t
put_header(unsigned char *h, int opcode, int fin, uint64_t len,
           const unsigned char *key)
{
  size_t n = 2;
  int i;

  h[0] = (unsigned char) ((fin ? 0x80 : 0) | opcode);

  if (len < 126) {
    h[1] = (unsigned char) len;

  } else if (len <= 0xFFFF) {
    h[1] = 126;
    h[2] = (unsigned char) (len >> 8);
    h[3] = (unsigned char) len;
    n = 4;

  } else {
    h[1] = 127;
    for (i = 0; i < 8; i++) {
      h[2 + i] = (unsigned char) (len >> (56 - 8 * i));
    }
    n = 10;
  }

  if (key != NULL) {
    h[1] |= 0x80;
    memcpy(h + n, key, 4);
    n += 4;
  }

  return n;
}


static int
check_kind(lua_State *L, int idx)
{
  return kind_opcodes[luaL_checkoption(L, idx, NULL, kind_names)];
}


static void
check_control(lua_State *L, int opcode, int fin, size_t len)
{
  if (opcode & 0x8) {
    if (!fin) {
      luaL_error(L, "control frames must not be fragmented");
    }
    if (len > WS_MAX_CONTROL) {
      luaL_error(L, "control frame payload must be at most 125 bytes");
    }
  }
}


/*
 * ws.frame_header(kind, length [, fin]): the header of an unmasked frame,
 * so a server can write header and payload with one writev and no copy.
 */
static int
l_frame_header(lua_State *L)
{
  int opcode = check_kind(L, 1);
  lua_Number len = luaL_checknumber(L, 2);
  int fin = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
  unsigned char h[14];
  size_t n;

  luaL_argcheck(L, len >= 0 && len <= 9007199254740992.0, 2,
                "must be a length >= 0");
  check_control(L, opcode, fin, (size_t) len);
  n = put_header(h, opcode, fin, (uint64_t) len, NULL);
  lua_pushlstring(L, (const char *) h, n);
  return 1;
}


/* Writes one frame into a fresh Lua string: a masked frame gets a new
 * random key from RAND_bytes. */
static int
push_frame(lua_State *L, int opcode, int fin, int masked, const char *p,
           size_t len)
{
  unsigned char key[4], h[14];
  unsigned char *out;
  size_t n;

  if (masked && RAND_bytes(key, sizeof(key)) != 1) {
    ERR_clear_error();
    return luaL_error(L, "RAND_bytes failed");
  }

  n = put_header(h, opcode, fin, len, masked ? key : NULL);

  if (len <= 256) {
    unsigned char small[14 + 256];

    memcpy(small, h, n);
    if (masked) {
      mask_copy(small + n, (const unsigned char *) p, len, key, 0);
    } else {
      memcpy(small + n, p, len);
    }
    lua_pushlstring(L, (const char *) small, n + len);
    return 1;
  }

  out = malloc(n + len);
  if (out == NULL) {
    return luaL_error(L, "out of memory encoding a %zu-byte frame", len);
  }

  memcpy(out, h, n);
  if (masked) {
    mask_copy(out + n, (const unsigned char *) p, len, key, 0);
  } else {
    memcpy(out + n, p, len);
  }

  lua_pushlstring(L, (const char *) out, n + len);
  free(out);
  return 1;
}


/*
 * ws.encode_frame(kind, payload [, fin [, mask [, i [, j]]]]): one
 * complete frame as a string. fin defaults to true, mask to false; i and j
 * select payload:sub(i, j) without making that substring first.
 */
static int
l_encode_frame(lua_State *L)
{
  int opcode = check_kind(L, 1);
  size_t len;
  const char *p = luaL_checklstring(L, 2, &len);
  int fin = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
  int masked = lua_toboolean(L, 4);
  lua_Integer i = luaL_optinteger(L, 5, 1);
  lua_Integer j = luaL_optinteger(L, 6, (lua_Integer) len);

  luaL_argcheck(L, i >= 1 && i <= (lua_Integer) len + 1, 5, "out of range");
  luaL_argcheck(L, j >= i - 1 && j <= (lua_Integer) len, 6, "out of range");

  p += i - 1;
  len = (size_t) (j - i + 1);
  check_control(L, opcode, fin, len);
  return push_frame(L, opcode, fin, masked, p, len);
}


/*
 * ws.close_frame([code [, reason [, mask]]]): a close frame. Without a code
 * the payload is empty. Raises on a code that may not be sent and on a
 * reason that is longer than 123 bytes or not valid UTF-8.
 */
static int
l_close_frame(lua_State *L)
{
  char payload[WS_MAX_CONTROL];
  const char *reason;
  size_t rlen = 0;
  lua_Integer code;

  if (lua_isnoneornil(L, 1)) {
    luaL_argcheck(L, lua_isnoneornil(L, 2), 2, "a reason needs a close code");
    return push_frame(L, WS_OP_CLOSE, 1, lua_toboolean(L, 3), "", 0);
  }

  code = luaL_checkinteger(L, 1);
  if (!close_code_valid(code)) {
    return luaL_argerror(
        L, 1,
        lua_pushfstring(L,
                        "close code %d may not be "
                        "sent: use 1000-1003, 1007-1014 or 3000-4999",
                        (int) code));
  }

  reason = luaL_optlstring(L, 2, "", &rlen);
  luaL_argcheck(L, rlen <= WS_MAX_REASON, 2, "must be at most 123 bytes");
  luaL_argcheck(L, utf8_valid(reason, rlen), 2, "must be valid UTF-8");

  payload[0] = (char) (code >> 8);
  payload[1] = (char) (code & 0xFF);
  memcpy(payload + 2, reason, rlen);
  return push_frame(L, WS_OP_CLOSE, 1, lua_toboolean(L, 3), payload, rlen + 2);
}


/* ---- parser ---- */

/*
 * An incremental frame parser. feed() hands it input; next() consumes
 * input until it has a complete message or control frame. Payload bytes go
 * straight from the input into the message buffer (unmasked on the way),
 * so what stays unconsumed between calls is at most a partial header. An
 * unmasked single-frame message that arrives whole is returned straight
 * from the input string without the buffer.
 */
typedef struct {
  int expect_masked; /* server role: client frames are masked */
  uint64_t max_frame;
  uint64_t max_message;

  unsigned char hdr[14]; /* header bytes collected so far */
  size_t hdr_len;
  int in_payload; /* header complete, payload pending */
  int opcode;
  int fin;
  int masked;
  unsigned char key[4];
  uint64_t remaining; /* payload bytes of this frame still due */
  uint64_t frame_pos; /* payload bytes of this frame seen */

  int msg_opcode; /* text or binary while assembling, else 0 */
  char *msg;
  size_t msg_len;
  size_t msg_cap;
  jv_utf8_t utf8;

  unsigned char ctrl[WS_MAX_CONTROL];
  size_t ctrl_len;

  int in_ref; /* registry reference anchoring in */
  const char *in;
  size_t in_len;
  size_t in_off;

  int close_code; /* sticky violation: the close code to send */
  const char *error;
  const char *error_code;
  int closed; /* a close frame was parsed */
} jv_ws_parser_t;


static jv_ws_parser_t *
check_parser(lua_State *L)
{
  return luaL_checkudata(L, 1, JV_WS_PARSER_MT);
}


static void
parser_drop_input(lua_State *L, jv_ws_parser_t *p)
{
  luaL_unref(L, LUA_REGISTRYINDEX, p->in_ref);
  p->in_ref = LUA_NOREF;
  p->in = NULL;
  p->in_len = 0;
  p->in_off = 0;
}


static uint64_t
opt_limit(lua_State *L, int idx, const char *field, uint64_t def)
{
  lua_Number v;

  lua_getfield(L, idx, field);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }

  v = luaL_checknumber(L, -1);
  lua_pop(L, 1);

  if (v < 1 || v > 4294967295.0) {
    luaL_error(L, "%s must be between 1 and 2^32 - 1 bytes", field);
  }

  return (uint64_t) v;
}


/*
 * ws.parser{role="server"|"client", max_frame=, max_message=}: a new
 * parser. A server expects masked frames, a client unmasked ones.
 * max_message (default 16 MiB) bounds an assembled message, max_frame
 * (default max_message) one frame.
 */
static int
l_parser_new(lua_State *L)
{
  static const char *const roles[] = { "server", "client", NULL };
  jv_ws_parser_t *p;
  uint64_t max_message, max_frame;
  int role;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "role");
  role = luaL_checkoption(L, -1, NULL, roles);
  lua_pop(L, 1);

  max_message = opt_limit(L, 1, "max_message", WS_DEFAULT_MAX_MESSAGE);
  max_frame = opt_limit(L, 1, "max_frame", max_message);

  p = lua_newuserdata(L, sizeof(*p));
  memset(p, 0, sizeof(*p));
  p->expect_masked = role == 0;
  p->max_message = max_message;
  p->max_frame = max_frame;
  p->in_ref = LUA_NOREF;
  utf8_reset(&p->utf8);
  luaL_getmetatable(L, JV_WS_PARSER_MT);
  lua_setmetatable(L, -2);
  return 1;
}


/* parser:feed(data): appends input; the parser keeps a reference to data
 * instead of copying it. */
static int
l_parser_feed(lua_State *L)
{
  jv_ws_parser_t *p = check_parser(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);

  if (len == 0) {
    return 0;
  }

  lua_settop(L, 2);

  if (p->in != NULL && p->in_off < p->in_len) {
    /* Input left after an event: join it with the new bytes. */
    lua_pushlstring(L, p->in + p->in_off, p->in_len - p->in_off);
    lua_pushvalue(L, 2);
    lua_concat(L, 2);
    lua_replace(L, 2);
    data = lua_tolstring(L, 2, &len);
  }

  parser_drop_input(L, p);
  lua_pushvalue(L, 2);
  p->in_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  p->in = data;
  p->in_len = len;
  return 0;
}


/* Records a violation and pushes nil, message, code, close code. */
static int
parser_fail(lua_State *L, jv_ws_parser_t *p, int close_code,
            const char *message)
{
  p->close_code = close_code;
  p->error = message;
  p->error_code = close_code == WS_CLOSE_TOO_BIG           ? "too_large"
                  : close_code == WS_CLOSE_INVALID_PAYLOAD ? "invalid_payload"
                                                           : "protocol_error";
  parser_drop_input(L, p);

  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, p->error_code);
  lua_pushinteger(L, close_code);
  return 4;
}


static size_t
header_need(const unsigned char *h, size_t have)
{
  size_t need = 2;

  if (have < 2) {
    return need;
  }

  if ((h[1] & 0x7F) == 126) {
    need += 2;
  } else if ((h[1] & 0x7F) == 127) {
    need += 8;
  }

  if (h[1] & 0x80) {
    need += 4;
  }

  return need;
}


/* Decodes a complete header into the frame fields and checks it. Returns
 * NULL, or the violation's message with *code set. */
static const char *
parser_header(jv_ws_parser_t *p, int *code)
{
  const unsigned char *h = p->hdr;
  uint64_t len = h[1] & 0x7F;
  size_t n = 2;
  int i;

  *code = WS_CLOSE_PROTOCOL;
  p->fin = (h[0] & 0x80) != 0;
  p->opcode = h[0] & 0x0F;
  p->masked = (h[1] & 0x80) != 0;

  if (h[0] & 0x70) {
    return "reserved bits set without a negotiated extension";
  }

  if (len == 126) {
    len = ((uint64_t) h[2] << 8) | h[3];
    n = 4;

  } else if (len == 127) {
    len = 0;
    for (i = 0; i < 8; i++) {
      len = (len << 8) | h[2 + i];
    }
    n = 10;

    if (len >> 63) {
      return "frame length has the most significant bit set";
    }
  }

  if (p->masked) {
    memcpy(p->key, h + n, 4);
  }

  if (p->masked != p->expect_masked) {
    return p->expect_masked ? "client frame is not masked"
                            : "server frame is masked";
  }

  switch (p->opcode) {
  case WS_OP_CONTINUATION:
    if (p->msg_opcode == 0) {
      return "continuation frame without a message to continue";
    }
    break;

  case WS_OP_TEXT:
  case WS_OP_BINARY:
    if (p->msg_opcode != 0) {
      return "new message before the previous one finished";
    }
    break;

  case WS_OP_CLOSE:
  case WS_OP_PING:
  case WS_OP_PONG:
    if (!p->fin) {
      return "fragmented control frame";
    }
    if (len > WS_MAX_CONTROL) {
      return "control frame payload longer than 125 bytes";
    }
    break;

  default:
    return "reserved opcode";
  }

  *code = WS_CLOSE_TOO_BIG;

  if (len > p->max_frame) {
    return "frame larger than max_frame";
  }

  if (!(p->opcode & 0x8) && p->msg_len + len > p->max_message) {
    return "message larger than max_message";
  }

  p->remaining = len;
  p->frame_pos = 0;
  return NULL;
}


/* Grows the message buffer to hold extra more bytes, never allocating more
 * than the current frame still needs. */
static int
msg_reserve(jv_ws_parser_t *p, size_t extra)
{
  size_t need = p->msg_len + extra;
  size_t cap;
  char *nb;

  if (need <= p->msg_cap) {
    return 0;
  }

  cap = p->msg_cap ? p->msg_cap * 2 : 4096;
  if (cap > p->msg_len + p->remaining) {
    cap = p->msg_len + (size_t) p->remaining;
  }
  if (cap < need) {
    cap = need;
  }

  nb = realloc(p->msg, cap);
  if (nb == NULL) {
    return -1;
  }

  p->msg = nb;
  p->msg_cap = cap;
  return 0;
}


static void
msg_reset(jv_ws_parser_t *p)
{
  p->msg_opcode = 0;
  p->msg_len = 0;
  utf8_reset(&p->utf8);

  if (p->msg_cap > WS_KEEP_BUFFER) {
    free(p->msg);
    p->msg = NULL;
    p->msg_cap = 0;
  }
}


/* Pushes the complete control frame as data, kind [, code]. */
static int
parser_control(lua_State *L, jv_ws_parser_t *p)
{
  const char *c = (const char *) p->ctrl;
  int code;

  if (p->opcode != WS_OP_CLOSE) {
    lua_pushlstring(L, c, p->ctrl_len);
    lua_pushstring(L, opcode_name(p->opcode));
    return 2;
  }

  p->closed = 1;

  if (p->ctrl_len == 0) {
    lua_pushliteral(L, "");
    lua_pushliteral(L, "close");
    return 2;
  }

  if (p->ctrl_len == 1) {
    return parser_fail(L, p, WS_CLOSE_PROTOCOL, "close payload of 1 byte");
  }

  code = (p->ctrl[0] << 8) | p->ctrl[1];
  if (!close_code_valid(code)) {
    return parser_fail(L, p, WS_CLOSE_PROTOCOL, "invalid close code");
  }

  if (!utf8_valid(c + 2, p->ctrl_len - 2)) {
    return parser_fail(L, p, WS_CLOSE_INVALID_PAYLOAD,
                       "close reason is not valid UTF-8");
  }

  lua_pushlstring(L, c + 2, p->ctrl_len - 2);
  lua_pushliteral(L, "close");
  lua_pushinteger(L, code);
  return 3;
}


/* Moves payload bytes of the current frame from the input. Returns 0, or
 * the count of values pushed (a violation). */
static int
parser_payload(lua_State *L, jv_ws_parser_t *p)
{
  size_t avail = p->in_len - p->in_off;
  size_t n = avail < p->remaining ? avail : (size_t) p->remaining;
  const unsigned char *src = (const unsigned char *) p->in + p->in_off;
  unsigned char *dst;

  if (n == 0) {
    return 0;
  }

  if (p->opcode & 0x8) {
    dst = p->ctrl + p->ctrl_len;
    p->ctrl_len += n;

  } else {
    if (msg_reserve(p, n) != 0) {
      return luaL_error(L, "out of memory assembling a WebSocket message");
    }
    dst = (unsigned char *) p->msg + p->msg_len;
    p->msg_len += n;
  }

  if (p->masked) {
    mask_copy(dst, src, n, p->key, p->frame_pos);
  } else {
    memcpy(dst, src, n);
  }

  p->in_off += n;
  p->remaining -= n;
  p->frame_pos += n;

  if (p->msg_opcode == WS_OP_TEXT && !(p->opcode & 0x8) &&
      utf8_feed(&p->utf8, dst, n) != 0) {
    return parser_fail(L, p, WS_CLOSE_INVALID_PAYLOAD,
                       "text message is not valid UTF-8");
  }

  return 0;
}


/* Returns the whole unmasked single-frame message straight from the input
 * when it is all there: no message buffer, one copy into Lua. */
static int
parser_direct(lua_State *L, jv_ws_parser_t *p)
{
  const char *data = p->in + p->in_off;
  size_t len = (size_t) p->remaining;

  if (p->opcode == WS_OP_TEXT && !utf8_valid(data, len)) {
    return parser_fail(L, p, WS_CLOSE_INVALID_PAYLOAD,
                       "text message is not valid UTF-8");
  }

  lua_pushlstring(L, data, len);
  lua_pushstring(L, opcode_name(p->opcode));
  p->in_off += len;
  p->remaining = 0;
  p->in_payload = 0;
  p->hdr_len = 0;
  msg_reset(p);
  return 2;
}


/*
 * parser:next(): returns the next event as data, kind [, code]: a message
 * (kind "text" or "binary"), a "ping" or "pong" with its payload, or a
 * "close" with its reason and code (no code when the payload was empty).
 * Returns nil when it needs more input, and nil, message, code, close_code
 * on a violation; the violation sticks.
 */
static int
l_parser_next(lua_State *L)
{
  jv_ws_parser_t *p = check_parser(L);
  const char *error;
  int nret, code;

  if (p->error != NULL) {
    lua_pushnil(L);
    lua_pushstring(L, p->error);
    lua_pushstring(L, p->error_code);
    lua_pushinteger(L, p->close_code);
    return 4;
  }

  while (!p->closed) {
    if (!p->in_payload) {
      size_t need = header_need(p->hdr, p->hdr_len);

      while (p->hdr_len < need && p->in_off < p->in_len) {
        p->hdr[p->hdr_len++] = (unsigned char) p->in[p->in_off++];
        need = header_need(p->hdr, p->hdr_len);
      }

      if (p->hdr_len < need) {
        break;
      }

      error = parser_header(p, &code);
      if (error != NULL) {
        return parser_fail(L, p, code, error);
      }

      p->in_payload = 1;
      p->ctrl_len = 0;

      if (!(p->opcode & 0x8) && p->opcode != WS_OP_CONTINUATION) {
        p->msg_opcode = p->opcode;
        utf8_reset(&p->utf8);

        if (p->fin && !p->masked && p->in_len - p->in_off >= p->remaining) {
          return parser_direct(L, p);
        }
      }
    }

    nret = parser_payload(L, p);
    if (nret > 0) {
      return nret;
    }

    if (p->remaining > 0) {
      break;
    }

    p->in_payload = 0;
    p->hdr_len = 0;

    if (p->opcode & 0x8) {
      return parser_control(L, p);
    }

    if (!p->fin) {
      continue;
    }

    if (p->msg_opcode == WS_OP_TEXT && p->utf8.need != 0) {
      return parser_fail(L, p, WS_CLOSE_INVALID_PAYLOAD,
                         "text message ends inside a UTF-8 sequence");
    }

    lua_pushlstring(L, p->msg != NULL ? p->msg : "", p->msg_len);
    lua_pushstring(L, opcode_name(p->msg_opcode));
    msg_reset(p);
    return 2;
  }

  if (p->in_off >= p->in_len) {
    parser_drop_input(L, p);
  }

  lua_pushnil(L);
  return 1;
}


static int
l_parser_gc(lua_State *L)
{
  jv_ws_parser_t *p = check_parser(L);

  parser_drop_input(L, p);
  free(p->msg);
  p->msg = NULL;
  p->msg_cap = 0;
  return 0;
}


static const char client_handshake_lua[] =
    "local client_request, check_response, max_head = ...\n"
    "return function(sock, opts)\n"
    "  local request, key = client_request(opts)\n"
    "  local ok, err, code = sock:write(request)\n"
    "  if not ok then\n"
    "    return nil, 'writing the handshake request failed: ' .. err, code\n"
    "  end\n"
    "  local head\n"
    "  head, err, code = sock:readuntil('\\r\\n\\r\\n', max_head)\n"
    "  if not head then\n"
    "    return nil, 'reading the handshake response failed: ' .. err, code\n"
    "  end\n"
    "  return check_response(head, key)\n"
    "end\n";


int
jv__open_ws(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "accept_key", l_accept_key },
                                    { "check_request", l_check_request },
                                    { "server_handshake", l_server_handshake },
                                    { "client_request", l_client_request },
                                    { "check_response", l_check_response },
                                    { "frame_header", l_frame_header },
                                    { "encode_frame", l_encode_frame },
                                    { "close_frame", l_close_frame },
                                    { "parser", l_parser_new },
                                    { "valid_utf8", l_valid_utf8 },
                                    { "valid_close_code", l_valid_close_code },
                                    { NULL, NULL } };
  static const luaL_Reg parser_methods[] = { { "feed", l_parser_feed },
                                             { "next", l_parser_next },
                                             { NULL, NULL } };

  luaL_newmetatable(L, JV_WS_PARSER_MT);
  lua_newtable(L);
  luaL_setfuncs(L, parser_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_parser_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);

  /* client_handshake writes, then waits for the response: a C function
   * cannot continue after a yield, so it is a small Lua function over the
   * C request builder and response check. */
  if (luaL_loadstring(L, client_handshake_lua) != 0) {
    return lua_error(L);
  }
  lua_pushcfunction(L, l_client_request);
  lua_pushcfunction(L, l_check_response);
  lua_pushinteger(L, WS_MAX_RESPONSE_HEAD);
  lua_call(L, 3, 1);
  lua_setfield(L, -2, "client_handshake");

  jv__open_pipe(L);
  lua_setfield(L, -2, "pipe");
  return 1;
}
