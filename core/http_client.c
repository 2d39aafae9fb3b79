/*
 * http_client.c: the HTTP/1.1 client (core.http.request).
 *
 * A request is written to a Lua socket and its response is parsed with
 * llhttp as the caller reads it, so a large body is never buffered whole.
 * Waiting for the socket must happen in Lua, because a C function cannot
 * continue after a yield under LuaJIT. So request, res:read and
 * res:read_body are a small embedded Lua chunk (client_lua below) over the
 * C parts in this file: a request-head builder and a response object that
 * parses the strings the chunk reads from the socket.
 *
 * Body bytes are not copied into a buffer of ours. The parser records each
 * body span as an offset into the string it was fed, and res:read returns
 * that string itself when one span covers all of it, or a substring.
 *
 * Strictness matches the server's: llhttp rejects Content-Length together
 * with Transfer-Encoding and duplicate Content-Length, and a scan here
 * rejects a bare LF or a folded line in a response head.
 */
#include "http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define JV_HTTP_RESPONSE_MT "justavps.http_response"

/* Defaults for the options of the same names. */
#define CLIENT_MAX_HEADER_SIZE (64 * 1024)
#define CLIENT_MAX_HEADERS     100
#define CLIENT_TIMEOUT         30
#define CLIENT_MAX_BODY        (16 * 1024 * 1024)

/* Bytes asked of the socket per read: also the largest body piece that
 * res:read returns without copying. */
#define CLIENT_READ_SIZE 65536

/* A server may send this many 1xx interim responses before the final
 * one. More is a protocol error, so that a peer cannot keep the client
 * busy forever without a final response. */
#define CLIENT_MAX_INTERIM 16

typedef struct {
  size_t off;
  size_t len;
} jv_span_t;

typedef struct {
  llhttp_t parser;
  size_t max_header_size;
  unsigned max_headers;

  /* Head of the current response: the reason phrase and the header
   * fields, referred to by offsets into h.head. */
  jv_http_head_t h;
  uint32_t reason_off;
  uint32_t reason_len;

  /* Bare-LF scan of the head, carried across reads. */
  unsigned crlf_run;
  char prev_byte;
  int head_scanned;

  /* The string being parsed, anchored in the uservalue table as
   * "input", and the body spans in it that res:read has not returned. */
  const char *input;
  size_t input_len;
  jv_span_t *spans;
  size_t nspans;
  size_t span_first;
  size_t span_cap;

  int status;
  int64_t content_length; /* -1 when the head has no Content-Length */
  unsigned ninterim;
  int is_head;       /* the request was HEAD: no body follows */
  int request_close; /* the request carried Connection: close */
  int interim;       /* the message being parsed is a 1xx */
  int headers_done;  /* the final response head is complete */
  int message_done;  /* the final response is complete */
  int keep_alive;
  int upgrade;       /* 101 Switching Protocols */
  int reuse_blocked; /* the request was not sent in full */
  int closed;        /* res:close() was called */
  int handed_over;   /* res:socket() gave the socket away */
  int failed;        /* err_msg and err_code are in the uservalue */

  /* The error a parser callback stopped the parser with. */
  int cb_code;
  const char *cb_message;
} jv_http_response_t;

static llhttp_settings_t response_settings;


/* ---- head storage ---- */

/* Records why a callback stopped the parser and returns llhttp's error. */
static int
callback_fail(jv_http_response_t *res, int code, const char *message)
{
  res->cb_code = code;
  res->cb_message = message;
  return -1;
}


static int
head_fail(jv_http_response_t *res, int rc)
{
  if (rc == JV_ETOOLARGE) {
    return callback_fail(res, JV_ETOOLARGE,
                         "response head exceeds max_header_size");
  }

  return callback_fail(res, JV_ENOMEM, "out of memory");
}


/* ---- parser callbacks ---- */

static int
on_message_begin(llhttp_t *p)
{
  jv_http_response_t *res = p->data;

  res->h.head_len = 0;
  res->reason_off = 0;
  res->reason_len = 0;
  res->h.nhdrs = 0;
  res->h.last_was_value = 0;
  res->interim = 0;
  return 0;
}


static int
on_status(llhttp_t *p, const char *at, size_t len)
{
  jv_http_response_t *res = p->data;
  int rc;

  if (res->reason_len == 0) {
    res->reason_off = (uint32_t) res->h.head_len;
  }

  rc = jv__http_head_append(&res->h, at, len, res->max_header_size);
  if (rc != 0) {
    return head_fail(res, rc);
  }

  res->reason_len += (uint32_t) len;
  return 0;
}


static int
on_header_field(llhttp_t *p, const char *at, size_t len)
{
  jv_http_response_t *res = p->data;
  int rc;

  if (res->headers_done) {
    /* A trailer field after a chunked body: dropped, so that the headers
     * the caller has seen stay as they were. */
    return 0;
  }

  if ((res->h.nhdrs == 0 || res->h.last_was_value) &&
      res->h.nhdrs >= res->max_headers) {
    return callback_fail(res, JV_ETOOLARGE,
                         "response has more header fields than "
                         "max_headers");
  }

  rc = jv__http_head_field(&res->h, at, len, res->max_header_size,
                           res->max_headers);
  return rc != 0 ? head_fail(res, rc) : 0;
}


static int
on_header_value(llhttp_t *p, const char *at, size_t len)
{
  jv_http_response_t *res = p->data;
  int rc;

  if (res->headers_done) {
    return 0;
  }

  rc = jv__http_head_value(&res->h, at, len, res->max_header_size);
  return rc != 0 ? head_fail(res, rc) : 0;
}


/*
 * Returns 1 to tell llhttp that no body follows, which it cannot know by
 * itself for a response to HEAD. llhttp 8.1 also expects a body after a
 * 204 or 304 with a Content-Length, but neither has one (a 304 often
 * repeats the length of the resource). A 101 ends the HTTP part of the
 * connection even without Connection: upgrade.
 */
static int
on_headers_complete(llhttp_t *p)
{
  jv_http_response_t *res = p->data;
  int status = p->status_code;

  if (status < 200 && status != 101) {
    /* An interim response (100 Continue, 103 Early Hints): skipped. */
    if (++res->ninterim > CLIENT_MAX_INTERIM) {
      return callback_fail(res, JV_EPROTOCOL,
                           "malformed response: too many interim "
                           "(1xx) responses");
    }

    res->interim = 1;
    return 0;
  }

  res->status = status;
  res->headers_done = 1;
  res->upgrade = (status == 101);
  res->content_length =
      (p->flags & F_CONTENT_LENGTH) ? (int64_t) p->content_length : -1;

  if (res->is_head || status == 101 || status == 204 || status == 304) {
    res->content_length = -1;
    return 1;
  }

  return 0;
}


/*
 * Queues a body span for res:read. llhttp allows pausing only from the
 * message and head callbacks, so this never pauses: every span of one
 * input string is queued and returned in order before the next read.
 */
static int
on_body(llhttp_t *p, const char *at, size_t len)
{
  jv_http_response_t *res = p->data;
  jv_span_t *sp;

  if (res->nspans > 0) {
    sp = &res->spans[res->nspans - 1];
    if (res->input + sp->off + sp->len == at) {
      sp->len += len;
      return 0;
    }
  }

  if (res->nspans == res->span_cap) {
    size_t cap = res->span_cap ? res->span_cap * 2 : 8;
    jv_span_t *ns = realloc(res->spans, cap * sizeof(*ns));

    if (ns == NULL) {
      return callback_fail(res, JV_ENOMEM, "out of memory");
    }

    res->spans = ns;
    res->span_cap = cap;
  }

  sp = &res->spans[res->nspans++];
  sp->off = (size_t) (at - res->input);
  sp->len = len;
  return 0;
}


/* Pauses after every message: after an interim one so that the head scan
 * restarts where the next head begins, after the final one so that bytes
 * beyond it go back to the socket unparsed. */
static int
on_message_complete(llhttp_t *p)
{
  jv_http_response_t *res = p->data;

  if (!res->interim) {
    res->message_done = 1;
    res->keep_alive = llhttp_should_keep_alive(p);
  }

  return HPE_PAUSED;
}


/*
 * Rejects a bare LF anywhere in a response head, and a line that starts
 * with a space or tab (obsolete line folding). llhttp 8 accepts both unless
 * built strict, but a proxy that relays the headers must not read a
 * different header list than the next parser would. Returns -1 on either.
 * Scanning stops at the blank line that ends the head.
 */
static int
scan_head(jv_http_response_t *res, const char *data, size_t len)
{
  return jv__http_scan_head(&res->prev_byte, &res->crlf_run, &res->head_scanned,
                            data, len);
}


static void
scan_reset(jv_http_response_t *res)
{
  res->head_scanned = 0;
  res->crlf_run = 0;
  res->prev_byte = 0;
}


/* ---- the response object ---- */

static jv_http_response_t *
check_response(lua_State *L, int idx)
{
  static const void *response_mt;

  return jv__check_udata(L, idx, JV_HTTP_RESPONSE_MT, &response_mt);
}


/* Pushes field name of the uservalue table of the response at idx. */
static void
get_uservalue(lua_State *L, int idx, const char *name)
{
  lua_getfenv(L, idx);
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
}


/* Sets field name of the uservalue table to the value on top, popping it. */
static void
set_uservalue(lua_State *L, int idx, const char *name)
{
  lua_getfenv(L, idx);
  lua_insert(L, -2);
  lua_setfield(L, -2, name);
  lua_pop(L, 1);
}


static void
drop_input(lua_State *L, jv_http_response_t *res, int idx)
{
  res->input = NULL;
  res->input_len = 0;
  res->nspans = 0;
  res->span_first = 0;
  lua_pushnil(L);
  set_uservalue(L, idx, "input");
}


/* Closes the response's socket through its own close method, so the
 * socket's bookkeeping runs and parked coroutines wake. */
static void
close_socket(lua_State *L, int idx)
{
  get_uservalue(L, idx, "sock");

  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return;
  }

  lua_getfield(L, -1, "close");
  lua_insert(L, -2);
  lua_call(L, 1, 0);
}


static int
push_stored_error(lua_State *L, int idx)
{
  lua_pushnil(L);
  get_uservalue(L, idx, "err_msg");
  get_uservalue(L, idx, "err_code");
  return 3;
}


/*
 * Makes the failure the response's sticky result: later reads return it
 * again, after any body pieces parsed before it. The connection is closed
 * because its framing is lost. Pushes nil, message, code and returns 3.
 */
static int
fail_with(lua_State *L, jv_http_response_t *res, int idx, const char *message,
          const char *code)
{
  if (!res->failed) {
    res->failed = 1;
    lua_pushstring(L, message);
    set_uservalue(L, idx, "err_msg");
    lua_pushstring(L, code);
    set_uservalue(L, idx, "err_code");

    if (!res->handed_over) {
      close_socket(L, idx);
    }
  }

  return push_stored_error(L, idx);
}


static int
fail_code(lua_State *L, jv_http_response_t *res, int idx, int code,
          const char *message)
{
  return fail_with(L, res, idx, message, jv_err_name(code));
}


static int
fail_parse(lua_State *L, jv_http_response_t *res, int idx, llhttp_errno_t err)
{
  const char *reason;
  char msg[160];

  if (err == HPE_USER && res->cb_code != 0) {
    return fail_code(L, res, idx, res->cb_code, res->cb_message);
  }

  reason = llhttp_get_error_reason(&res->parser);
  snprintf(msg, sizeof(msg), "malformed response: %s",
           reason ? reason : llhttp_errno_name(err));
  return fail_code(L, res, idx, JV_EPROTOCOL, msg);
}


/* Handles the end of the stream: completes a close-delimited body, or
 * fails when the response was cut short. */
static int
feed_eof(lua_State *L, jv_http_response_t *res)
{
  llhttp_errno_t err;

  if (!res->headers_done) {
    return fail_code(L, res, 1, JV_ECLOSED,
                     res->h.head_len == 0 && res->parser.status_code == 0
                         ? "connection closed before a response arrived"
                         : "connection closed inside the response head");
  }

  err = llhttp_finish(&res->parser);
  if ((err == HPE_OK || err == HPE_PAUSED) && res->message_done) {
    lua_pushboolean(L, 1);
    return 1;
  }

  return fail_code(L, res, 1, JV_ECLOSED,
                   "connection closed before the end of the "
                   "response body");
}


/*
 * res:_feed(data): parses the next string read from the socket, or the end
 * of the stream when data is nil. Returns true or nil, message, code.
 * Bytes after the end of the final response (the next response, or the
 * first bytes of an upgraded protocol) go back into the socket.
 */
static int
l_response_feed(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  const char *data;
  size_t len = 0, pos = 0, stop;
  llhttp_errno_t err;

  if (res->failed) {
    return push_stored_error(L, 1);
  }

  if (res->closed) {
    return fail_code(L, res, 1, JV_ECLOSED, "response was closed");
  }

  if (res->message_done || res->span_first < res->nspans) {
    return luaL_error(L, "response fed while it still has unread input");
  }

  if (lua_isnoneornil(L, 2)) {
    return feed_eof(L, res);
  }

  data = luaL_checklstring(L, 2, &len);
  lua_pushvalue(L, 2);
  set_uservalue(L, 1, "input");
  res->input = data;
  res->input_len = len;
  res->nspans = 0;
  res->span_first = 0;

  while (pos < len) {
    if (scan_head(res, data + pos, len - pos) != 0) {
      return fail_code(L, res, 1, JV_EPROTOCOL,
                       "malformed response: bare LF or folded "
                       "line in response head");
    }

    err = llhttp_execute(&res->parser, data + pos, len - pos);
    if (err == HPE_OK) {
      break;
    }

    if (err != HPE_PAUSED && err != HPE_PAUSED_UPGRADE) {
      return fail_parse(L, res, 1, err);
    }

    stop = (size_t) (llhttp_get_error_pos(&res->parser) - data);

    if (res->message_done) {
      if (stop < len) {
        jv_sock_t *sock;

        get_uservalue(L, 1, "sock");
        sock = jv__sock_check(L, -1, 1);
        lua_pop(L, 1);
        if (jv__sock_unread(sock, data + stop, len - stop) != 0) {
          return fail_code(L, res, 1, JV_ENOMEM, "out of memory");
        }
      }
      break;
    }

    /* An interim response ended: parse on with a fresh head scan. */
    llhttp_resume(&res->parser);
    scan_reset(res);
    pos = stop;
  }

  if (res->nspans == 0) {
    drop_input(L, res, 1);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* Pushes the next body piece of at most want bytes from the queued spans. */
static void
push_piece(lua_State *L, jv_http_response_t *res, size_t want)
{
  jv_span_t *sp = &res->spans[res->span_first];
  luaL_Buffer b;
  size_t n;

  if (sp->len >= want || res->span_first + 1 == res->nspans) {
    n = sp->len < want ? sp->len : want;

    if (sp->off == 0 && n == res->input_len) {
      get_uservalue(L, 1, "input");

    } else {
      lua_pushlstring(L, res->input + sp->off, n);
    }

    sp->off += n;
    sp->len -= n;
    if (sp->len == 0) {
      res->span_first++;
    }
    return;
  }

  /* Several spans (small chunks): join them into one piece. */
  luaL_buffinit(L, &b);
  while (want > 0 && res->span_first < res->nspans) {
    sp = &res->spans[res->span_first];
    n = sp->len < want ? sp->len : want;
    luaL_addlstring(&b, res->input + sp->off, n);
    sp->off += n;
    sp->len -= n;
    want -= n;
    if (sp->len == 0) {
      res->span_first++;
    }
  }
  luaL_pushresult(&b);
}


/*
 * res:_take([max]): returns the next body piece already parsed, at most
 * max bytes (default: all that is queued). Returns false when more input
 * is needed, nil at the end of the body, and nil, message, code after a
 * failure.
 */
static int
l_response_take(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 0);

  luaL_argcheck(L, max >= 0, 2, "must be >= 0");

  if (res->closed) {
    return jv__push_error_msg(L, JV_ECLOSED, "response was closed");
  }

  if (res->span_first < res->nspans) {
    push_piece(L, res, max > 0 ? (size_t) max : (size_t) -1);
    if (res->span_first == res->nspans) {
      drop_input(L, res, 1);
    }
    return 1;
  }

  if (res->failed) {
    return push_stored_error(L, 1);
  }

  if (res->message_done) {
    lua_pushnil(L);
    return 1;
  }

  lua_pushboolean(L, 0);
  return 1;
}


/* res:_fail(message, code): records a failure to read from the socket. */
static int
l_response_fail(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  const char *message = luaL_checkstring(L, 2);
  const char *code = luaL_checkstring(L, 3);

  return fail_with(L, res, 1, message, code);
}


/* res:_block_reuse(): the request was not sent in full, so the
 * connection cannot carry another request. */
static int
l_response_block_reuse(lua_State *L)
{
  check_response(L, 1)->reuse_blocked = 1;
  return 0;
}


static int
l_response_head_done(lua_State *L)
{
  lua_pushboolean(L, check_response(L, 1)->headers_done);
  return 1;
}


static int
l_response_content_length(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  if (res->content_length < 0) {
    lua_pushnil(L);

  } else {
    lua_pushnumber(L, (lua_Number) res->content_length);
  }

  return 1;
}


/* res:_conn(): the socket to read from. */
static int
l_response_conn(lua_State *L)
{
  check_response(L, 1);
  get_uservalue(L, 1, "sock");
  return 1;
}


static int l_response_methods_ref = LUA_NOREF;


/* Returns res.status, res.version and res.reason. Any other key looks up
 * a method. */
static int
l_response_index(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  const char *key = luaL_checkstring(L, 2);

  if (strcmp(key, "status") == 0) {
    lua_pushinteger(L, res->status);
    return 1;
  }

  if (strcmp(key, "version") == 0) {
    lua_pushfstring(L, "%d.%d", res->parser.http_major, res->parser.http_minor);
    return 1;
  }

  if (strcmp(key, "reason") == 0) {
    lua_pushlstring(L, res->h.head + res->reason_off, res->reason_len);
    return 1;
  }

  lua_pushnil(L);
  return 1;
}


/* res:header(name): the first value of a header, case-insensitive. */
static int
l_response_header(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  const char *name = luaL_checkstring(L, 2);
  const char *v;
  size_t len;

  v = jv__http_find_header(res->h.head, res->h.hdrs, res->h.nhdrs, name, &len);
  if (v == NULL) {
    lua_pushnil(L);

  } else {
    lua_pushlstring(L, v, len);
  }

  return 1;
}


/* res:headers(): returns a table of lower-case names to values. A
 * repeated header maps to an array of its values in order. */
static int
l_response_headers(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  jv__http_push_headers(L, res->h.head, res->h.hdrs, res->h.nhdrs);
  return 1;
}


/* res:header_list(): {{name, value}, ...} as received, names unchanged. */
static int
l_response_header_list(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  jv__http_push_header_list(L, res->h.head, res->h.hdrs, res->h.nhdrs);
  return 1;
}


/* res:relay_head(req): writes this response's status and end-to-end
 * header fields to the client of the server request req, with no Lua
 * header tables (see jv__http_relay_head). Returns true, or nil, message,
 * code when the write fails. */
static int
l_response_relay_head(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  if (!res->headers_done) {
    return luaL_error(L, "response head not received yet");
  }

  return jv__http_relay_head(L, 2, res->status, res->h.head, res->h.hdrs,
                             res->h.nhdrs);
}


/*
 * res:relay(req): like relay_head, and sends in the same write the body
 * bytes already parsed. When they are the whole body the response to req
 * ends there (req:finish is not called). Returns true, "done" when the
 * response is complete, true, "more" when the caller relays the rest with
 * res:read and req:write, or nil, message, code when the write fails.
 */
static int
l_response_relay(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);
  uv_buf_t body[JV_HTTP_RELAY_MAX_PIECES];
  unsigned nbody = 0;
  int complete, rc;

  if (!res->headers_done) {
    return luaL_error(L, "response head not received yet");
  }

  if (res->status < 200 || res->closed) {
    rc = jv__http_relay_head(L, 2, res->status, res->h.head, res->h.hdrs,
                             res->h.nhdrs);
    if (rc == 1) {
      lua_pushstring(L, "more");
      return 2;
    }
    return rc;
  }

  while (res->span_first < res->nspans && nbody < JV_HTTP_RELAY_MAX_PIECES) {
    jv_span_t *sp = &res->spans[res->span_first];

    body[nbody++] =
        uv_buf_init((char *) res->input + sp->off, (unsigned) sp->len);
    res->span_first++;
  }

  complete =
      res->message_done && !res->failed && res->span_first == res->nspans;

  /* The pieces point into the input string, which stays anchored until
   * the write has taken (or copied) them. */
  rc = jv__http_relay_response(L, 2, res->status, res->h.head, res->h.hdrs,
                               res->h.nhdrs, body, nbody, complete);

  if (res->span_first == res->nspans) {
    drop_input(L, res, 1);
  }

  return rc;
}


static int
may_reuse(jv_http_response_t *res)
{
  return res->message_done && res->keep_alive && !res->upgrade &&
         !res->request_close && !res->reuse_blocked && !res->failed &&
         !res->closed && res->span_first == res->nspans;
}


/* res:keepalive(): true once the body was read in full and both sides
 * allow another request on the connection. */
static int
l_response_keepalive(lua_State *L)
{
  lua_pushboolean(L, may_reuse(check_response(L, 1)));
  return 1;
}


/*
 * res:socket(): hands the socket over, after a 101 Switching Protocols
 * (with any bytes after the head unread in it) or, for reuse, after the
 * body was read in full. Raises when body bytes remain unread, and
 * returns nil, message, "closed" when the connection cannot be reused.
 */
static int
l_response_socket(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  if (res->failed) {
    return push_stored_error(L, 1);
  }

  if (res->closed) {
    return jv__push_error_msg(L, JV_ECLOSED, "response was closed");
  }

  if (!res->upgrade) {
    if (!res->message_done || res->span_first < res->nspans) {
      return luaL_error(L, "read the whole response body before taking "
                           "the socket");
    }

    if (!may_reuse(res)) {
      return jv__push_error_msg(L, JV_ECLOSED,
                                "connection cannot be reused: the "
                                "request or the response ends it");
    }
  }

  res->handed_over = 1;
  get_uservalue(L, 1, "sock");
  return 1;
}


/* res:close(): closes the connection unless res:socket() handed it over.
 * Safe to call twice. */
static int
l_response_close(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  if (res->closed) {
    return 0;
  }

  res->closed = 1;
  drop_input(L, res, 1);

  if (!res->handed_over) {
    close_socket(L, 1);
  }

  return 0;
}


static int
l_response_gc(lua_State *L)
{
  jv_http_response_t *res = check_response(L, 1);

  free(res->h.head);
  free(res->h.hdrs);
  free(res->spans);
  res->h.head = NULL;
  res->h.hdrs = NULL;
  res->spans = NULL;
  return 0;
}


/* new_response(sock, is_head, request_close, max_header_size,
 * max_headers): a response object that parses what is read from sock. */
static int
l_response_new(lua_State *L)
{
  lua_Integer max_header_size = luaL_optinteger(L, 4, CLIENT_MAX_HEADER_SIZE);
  lua_Integer max_headers = luaL_optinteger(L, 5, CLIENT_MAX_HEADERS);
  jv_http_response_t *res;

  jv__sock_check(L, 1, 0);
  luaL_argcheck(L, max_header_size > 0 && max_header_size <= UINT32_MAX, 4,
                "max_header_size must be 1 to 4294967295");
  luaL_argcheck(L, max_headers > 0 && max_headers <= 65535, 5,
                "max_headers must be 1 to 65535");

  res = lua_newuserdata(L, sizeof(*res));
  memset(res, 0, sizeof(*res));
  res->max_header_size = (size_t) max_header_size;
  res->max_headers = (unsigned) max_headers;
  res->is_head = lua_toboolean(L, 2);
  res->request_close = lua_toboolean(L, 3);
  res->content_length = -1;
  luaL_getmetatable(L, JV_HTTP_RESPONSE_MT);
  lua_setmetatable(L, -2);

  lua_createtable(L, 0, 4);
  lua_pushvalue(L, 1);
  lua_setfield(L, -2, "sock");
  lua_setfenv(L, -2);

  llhttp_init(&res->parser, HTTP_RESPONSE, &response_settings);
  res->parser.data = res;

  /* llhttp would reject the final response as data after the end when a
   * 1xx carried Connection: close or came from an HTTP/1.0 server. Only the
   * final response decides keep-alive here. */
  llhttp_set_lenient_keep_alive(&res->parser, 1);
  return 1;
}


/* ---- the request head ---- */

/* RFC 9110 tchar: the characters of a method or header name. */
static int
is_token(const char *s, size_t len)
{
  size_t i;

  if (len == 0) {
    return 0;
  }

  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char) s[i];

    if (ch <= ' ' || ch >= 0x7f || strchr("\"(),/:;<=>?@[\\]{}", ch)) {
      return 0;
    }
  }

  return 1;
}


/* Appends to out at *pos, or only counts when out is NULL. */
static void
emit(char *out, size_t *pos, const char *s, size_t len)
{
  if (out != NULL) {
    memcpy(out + *pos, s, len);
  }

  *pos += len;
}


static void
emit_str(char *out, size_t *pos, const char *s)
{
  emit(out, pos, s, strlen(s));
}


static void
emit_header(char *out, size_t *pos, const char *name, size_t nlen,
            const char *value, size_t vlen)
{
  emit(out, pos, name, nlen);
  emit(out, pos, ": ", 2);
  emit(out, pos, value, vlen);
  emit(out, pos, "\r\n", 2);
}


typedef struct {
  const char *method;
  size_t method_len;
  const char *target;
  size_t target_len;
  char host[300]; /* the default Host value */
  const char *body;
  size_t body_len;
  int has_reader;
  int headers_index; /* 0 when opts.headers is nil */
  int has_host;      /* set by a pass over the headers */
  int has_length;
  int64_t length;
  int close;
} jv_request_t;


/* Writes one user header and raises on an invalid one. value_index is a
 * string or a number. Runs in the counting pass (out == NULL) first, which
 * makes every check before the writing pass. */
static void
emit_user_header(lua_State *L, jv_request_t *rq, char *out, size_t *pos,
                 const char *name, size_t nlen, int value_index)
{
  size_t vlen;
  const char *v;

  if (lua_type(L, value_index) != LUA_TSTRING &&
      lua_type(L, value_index) != LUA_TNUMBER) {
    luaL_error(L,
               "header %s: value must be a string, a number or an array "
               "of them",
               name);
  }

  v = lua_tolstring(L, value_index, &vlen);
  if (!jv__http_value_ok(v, vlen)) {
    luaL_error(L, "header %s: value contains CR, LF or NUL", name);
  }

  if (out == NULL) {
    if (strcasecmp(name, "host") == 0) {
      rq->has_host = 1;

    } else if (strcasecmp(name, "transfer-encoding") == 0) {
      luaL_error(L, "header Transfer-Encoding is set by the client: give "
                    "body_reader without Content-Length to send chunked");

    } else if (strcasecmp(name, "content-length") == 0) {
      char *end;
      long long n = strtoll(v, &end, 10);

      if (rq->has_length || vlen == 0 || *end != '\0' || n < 0 || v[0] < '0' ||
          v[0] > '9') {
        luaL_error(L,
                   "header Content-Length: expected one decimal "
                   "number, got '%s'",
                   v);
      }

      if (rq->body != NULL && (size_t) n != rq->body_len) {
        luaL_error(L, "header Content-Length is %s but body has %d bytes", v,
                   (int) rq->body_len);
      }

      rq->has_length = 1;
      rq->length = n;

    } else if (strcasecmp(name, "connection") == 0 &&
               jv__http_list_has_token(v, vlen, "close", 5)) {
      rq->close = 1;
    }
  }

  emit_header(out, pos, name, nlen, v, vlen);
}


/* Writes the request head into out, or only measures it when out is NULL.
 * Returns its length. */
static size_t
emit_head(lua_State *L, jv_request_t *rq, char *out)
{
  size_t pos = 0;
  char num[32];

  emit(out, &pos, rq->method, rq->method_len);
  emit(out, &pos, " ", 1);
  emit(out, &pos, rq->target, rq->target_len);
  emit_str(out, &pos, " HTTP/1.1\r\n");

  if (rq->headers_index != 0) {
    lua_pushnil(L);
    while (lua_next(L, rq->headers_index) != 0) {
      const char *name;
      size_t nlen;

      if (lua_type(L, -2) != LUA_TSTRING) {
        luaL_error(L, "header names must be strings");
      }

      name = lua_tolstring(L, -2, &nlen);
      if (!is_token(name, nlen)) {
        luaL_error(L, "invalid header name '%s'", name);
      }

      if (lua_istable(L, -1)) {
        int i, n = (int) lua_objlen(L, -1);

        for (i = 1; i <= n; i++) {
          lua_rawgeti(L, -1, i);
          emit_user_header(L, rq, out, &pos, name, nlen, lua_gettop(L));
          lua_pop(L, 1);
        }

      } else {
        emit_user_header(L, rq, out, &pos, name, nlen, lua_gettop(L));
      }

      lua_pop(L, 1);
    }
  }

  if (!rq->has_host) {
    emit_header(out, &pos, "Host", 4, rq->host, strlen(rq->host));
  }

  if (!rq->has_length) {
    if (rq->body != NULL) {
      snprintf(num, sizeof(num), "%zu", rq->body_len);
      emit_header(out, &pos, "Content-Length", 14, num, strlen(num));

    } else if (rq->has_reader) {
      emit_str(out, &pos, "Transfer-Encoding: chunked\r\n");

    } else if ((rq->method_len == 4 && memcmp(rq->method, "POST", 4) == 0) ||
               (rq->method_len == 3 && memcmp(rq->method, "PUT", 3) == 0) ||
               (rq->method_len == 5 && memcmp(rq->method, "PATCH", 5) == 0)) {
      /* A server may reject a body-carrying method without a length
       * with 411 Length Required, even for an empty body. */
      emit_str(out, &pos, "Content-Length: 0\r\n");
    }
  }

  emit(out, &pos, "\r\n", 2);
  return pos;
}


/* Sets rq->host to the default Host value: the name, bracketed when it is
 * an IPv6 literal, with the port unless it is the scheme's default. */
static void
default_host(lua_State *L, jv_request_t *rq, const char *name, int port,
             int tls)
{
  int v6 = strchr(name, ':') != NULL;
  int n;

  if ((tls && port == 443) || (!tls && port == 80)) {
    n = snprintf(rq->host, sizeof(rq->host), v6 ? "[%s]" : "%s", name);

  } else {
    n = snprintf(rq->host, sizeof(rq->host), v6 ? "[%s]:%d" : "%s:%d", name,
                 port);
  }

  if (n < 0 || (size_t) n >= sizeof(rq->host)) {
    luaL_error(L, "host or server_name too long");
  }

  if (!jv__http_value_ok(rq->host, (size_t) n)) {
    luaL_error(L, "host or server_name contains CR, LF or NUL");
  }
}


static const char *
opt_string(lua_State *L, const char *field, const char *def, size_t *len)
{
  const char *s;

  lua_getfield(L, 1, field);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    if (len != NULL && def != NULL) {
      *len = strlen(def);
    }
    return def;
  }

  if (lua_type(L, -1) != LUA_TSTRING) {
    luaL_error(L, "option %s must be a string", field);
  }

  /* opts anchors the string. */
  s = lua_tolstring(L, -1, len);
  lua_pop(L, 1);
  return s;
}


/*
 * build_request(opts): checks opts and returns the request head, the body
 * mode ("none", "string", "chunked" or "length"), the Content-Length of a
 * streamed body (or nil), and whether the request ends the connection.
 * Raises on any invalid option.
 */
static int
l_build_request(lua_State *L)
{
  jv_request_t rq;
  const char *hostname, *server_name;
  const char *mode;
  jv_sock_t *sock = NULL;
  char peer[64];
  int port, peer_port, tls;
  size_t len;
  char *out;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  memset(&rq, 0, sizeof(rq));

  rq.method = opt_string(L, "method", "GET", &rq.method_len);
  if (!is_token(rq.method, rq.method_len)) {
    return luaL_error(L, "invalid method '%s'", rq.method);
  }

  if (strcmp(rq.method, "CONNECT") == 0) {
    return luaL_error(L, "method CONNECT is not supported: its response "
                         "opens a tunnel, not a message");
  }

  rq.target = opt_string(L, "path", "/", &rq.target_len);
  if (!jv__http_target_ok(rq.target, rq.target_len)) {
    return luaL_error(L, "invalid path: it must be non-empty, without "
                         "spaces or control characters");
  }

  lua_getfield(L, 1, "sock");
  if (!lua_isnil(L, -1)) {
    sock = jv__sock_check(L, -1, 0);
  }
  lua_pop(L, 1);

  /* A reused socket already is TLS or not, whatever opts.tls is. */
  lua_getfield(L, 1, "tls");
  tls = sock != NULL ? jv__sock_stream(sock)->ssl != NULL : !lua_isnil(L, -1);
  lua_pop(L, 1);

  server_name = opt_string(L, "server_name", NULL, NULL);
  if (sock == NULL && tls && server_name == NULL) {
    return luaL_error(L, "option server_name is required with tls: the "
                         "certificate is checked against it");
  }

  lua_getfield(L, 1, "port");
  port = (int) luaL_optinteger(L, -1, 0);
  lua_pop(L, 1);

  hostname = opt_string(L, "host", NULL, NULL);
  if (hostname == NULL && sock == NULL) {
    return luaL_error(L, "option host is required unless sock is given");
  }

  if (hostname == NULL &&
      jv_stream_address(jv__sock_stream(sock), 1, peer, sizeof(peer),
                        port == 0 ? &port : &peer_port) == 0) {
    /* The Host of a reused connection defaults to its peer address. */
    hostname = peer;
  }

  if (hostname == NULL) {
    return luaL_error(L, "option host is required: the socket has no peer "
                         "address");
  }

  if (port == 0) {
    port = tls ? 443 : 80;
  }

  if (port < 1 || port > 65535) {
    return luaL_error(L, "option port must be 1 to 65535");
  }

  default_host(L, &rq, server_name != NULL ? server_name : hostname, port, tls);

  rq.body = opt_string(L, "body", NULL, &rq.body_len);

  lua_getfield(L, 1, "body_reader");
  if (!lua_isnil(L, -1)) {
    if (!lua_isfunction(L, -1)) {
      return luaL_error(L, "option body_reader must be a function");
    }

    if (rq.body != NULL) {
      return luaL_error(L, "give body or body_reader, not both");
    }

    rq.has_reader = 1;
  }
  lua_pop(L, 1);

  lua_getfield(L, 1, "headers");
  if (!lua_isnil(L, -1)) {
    luaL_checktype(L, -1, LUA_TTABLE);
    rq.headers_index = lua_gettop(L);
  }

  /* Pass one checks everything and measures, then pass two writes into a
   * scratch userdata, so nothing leaks when a check raises. */
  len = emit_head(L, &rq, NULL);
  out = lua_newuserdata(L, len);
  emit_head(L, &rq, out);
  lua_pushlstring(L, out, len);

  if (rq.body != NULL) {
    mode = "string";

  } else if (!rq.has_reader) {
    mode = "none";

  } else if (rq.has_length) {
    mode = "length";

  } else {
    mode = "chunked";
  }

  lua_pushstring(L, mode);
  if (rq.has_reader && rq.has_length) {
    lua_pushnumber(L, (lua_Number) rq.length);

  } else {
    lua_pushnil(L);
  }
  lua_pushboolean(L, rq.close);
  return 4;
}


/* ---- the waiting parts, in Lua ---- */

static const char client_lua[] =
    "local build_request, new_response, read_size, default_timeout,\n"
    "  default_max_body = ...\n"
    "local concat, format, type, pcall, error, tostring, require =\n"
    "  table.concat, string.format, type, pcall, error, tostring, require\n"
    "\n"
    "-- core.tcp.connect, looked up on first use: the core table is still\n"
    "-- being built when this chunk runs.\n"
    "local connect\n"
    "local core\n"
    "\n"
    "-- Reads once from the socket and parses what arrived.\n"
    "local function fill(res, sock)\n"
    "  local data, err, code = sock:read(read_size)\n"
    "  if data == nil and code ~= 'closed' then\n"
    "    return res:_fail('reading the response failed: ' .. err, code)\n"
    "  end\n"
    "  return res:_feed(data)\n"
    "end\n"
    "\n"
    "local function read(res, max)\n"
    "  if max ~= nil and (type(max) ~= 'number' or max < 1) then\n"
    "    error('bad argument #1 to read (max must be a number >= 1)', 2)\n"
    "  end\n"
    "  while true do\n"
    "    local piece, err, code = res:_take(max)\n"
    "    if piece then\n"
    "      return piece\n"
    "    elseif piece == nil then\n"
    "      return nil, err, code\n"
    "    end\n"
    "    local ok\n"
    "    ok, err, code = fill(res, res:_conn())\n"
    "    if not ok then\n"
    "      return nil, err, code\n"
    "    end\n"
    "  end\n"
    "end\n"
    "\n"
    "local function read_body(res, max_bytes)\n"
    "  max_bytes = max_bytes or default_max_body\n"
    "  if type(max_bytes) ~= 'number' or max_bytes < 0 then\n"
    "    error('bad argument #1 to read_body (max_bytes must be a number '\n"
    "      .. '>= 0)', 2)\n"
    "  end\n"
    "  local too_large = 'response body exceeds ' .. max_bytes .. ' bytes'\n"
    "  local length = res:_content_length()\n"
    "  if length ~= nil and length > max_bytes then\n"
    "    res:close()\n"
    "    return nil, too_large, 'too_large'\n"
    "  end\n"
    "  local parts, n, total = {}, 0, 0\n"
    "  while true do\n"
    "    local piece, err, code = read(res)\n"
    "    if piece == nil then\n"
    "      if err ~= nil then\n"
    "        return nil, err, code\n"
    "      end\n"
    "      break\n"
    "    end\n"
    "    total = total + #piece\n"
    "    if total > max_bytes then\n"
    "      res:close()\n"
    "      return nil, too_large, 'too_large'\n"
    "    end\n"
    "    n = n + 1\n"
    "    parts[n] = piece\n"
    "  end\n"
    "  if n == 1 then\n"
    "    return parts[1]\n"
    "  end\n"
    "  return concat(parts, '', 1, n)\n"
    "end\n"
    "\n"
    "-- Streams the body_reader's chunks. Returns true, or nil, message,\n"
    "-- code when a write fails, or false, message when the reader "
    "misbehaves.\n"
    "local function send_body(sock, reader, chunked, length)\n"
    "  local sent = 0\n"
    "  while true do\n"
    "    local chunk = reader()\n"
    "    if chunk == nil then\n"
    "      break\n"
    "    end\n"
    "    if type(chunk) ~= 'string' then\n"
    "      return false, 'body_reader returned a ' .. type(chunk)\n"
    "        .. ', expected a string or nil'\n"
    "    end\n"
    "    if #chunk > 0 then\n"
    "      local ok, err, code\n"
    "      if chunked then\n"
    "        ok, err, code = sock:write({ format('%x\\r\\n', #chunk), chunk,\n"
    "          '\\r\\n' })\n"
    "      else\n"
    "        if sent + #chunk > length then\n"
    "          return false, 'body_reader returned more than the '\n"
    "            .. length .. ' bytes of Content-Length'\n"
    "        end\n"
    "        ok, err, code = sock:write(chunk)\n"
    "      end\n"
    "      if not ok then\n"
    "        return nil, err, code\n"
    "      end\n"
    "      sent = sent + #chunk\n"
    "    end\n"
    "  end\n"
    "  if chunked then\n"
    "    return sock:write('0\\r\\n\\r\\n')\n"
    "  end\n"
    "  if sent ~= length then\n"
    "    return false, 'body_reader returned ' .. sent .. ' bytes but '\n"
    "      .. 'Content-Length is ' .. length\n"
    "  end\n"
    "  return true\n"
    "end\n"
    "\n"
    "-- A server that rejects a request early may close its side while the\n"
    "-- body is still being sent, yet its response is worth reading.\n"
    "local peer_gone = { EPIPE = true, ECONNRESET = true }\n"
    "\n"
    "local function request(opts)\n"
    "  if type(opts) ~= 'table' then\n"
    "    error('bad argument #1 to request (table of options expected)', 2)\n"
    "  end\n"
    "  local head, mode, length, request_close = build_request(opts)\n"
    "  local timeout = opts.timeout or default_timeout\n"
    "  if type(timeout) ~= 'number' or timeout < 0 then\n"
    "    error('option timeout must be a number >= 0', 2)\n"
    "  end\n"
    "  local sock, ok, err, code = opts.sock\n"
    "  if sock ~= nil then\n"
    "    sock:settimeout(timeout)\n"
    "  else\n"
    "    local port = opts.port or (opts.tls and 443 or 80)\n"
    "    connect = connect or require('justavps.core').tcp.connect\n"
    "    sock, err, code = connect(opts.host, port, { tls = opts.tls,\n"
    "      server_name = opts.server_name, timeout = timeout })\n"
    "    if sock == nil then\n"
    "      return nil, 'connecting to ' .. tostring(opts.host) .. ' port '\n"
    "        .. port .. ' failed: ' .. err, code\n"
    "    end\n"
    "  end\n"
    "\n"
    "  if mode == 'string' then\n"
    "    ok, err, code = sock:write({ head, opts.body })\n"
    "  else\n"
    "    ok, err, code = sock:write(head)\n"
    "  end\n"
    "  if ok and (mode == 'chunked' or mode == 'length') then\n"
    "    local ran\n"
    "    ran, ok, err, code = pcall(send_body, sock, opts.body_reader,\n"
    "      mode == 'chunked', length)\n"
    "    if not ran then\n"
    "      sock:close()\n"
    "      error(ok, 0)\n"
    "    end\n"
    "    if ok == false then\n"
    "      sock:close()\n"
    "      error(err, 2)\n"
    "    end\n"
    "  end\n"
    "  if not ok and not peer_gone[code] then\n"
    "    sock:close()\n"
    "    return nil, 'writing the request failed: ' .. err, code\n"
    "  end\n"
    "\n"
    "  local res = new_response(sock, opts.method == 'HEAD', request_close,\n"
    "    opts.max_header_size, opts.max_headers)\n"
    "  if not ok then\n"
    "    res:_block_reuse()\n"
    "  end\n"
    "  while not res:_head_done() do\n"
    "    local filled, rerr, rcode = fill(res, sock)\n"
    "    if not filled and res:_head_done() then\n"
    "      -- The body went wrong in the same read: res:read reports it.\n"
    "      break\n"
    "    elseif not filled then\n"
    "      if not ok then\n"
    "        return nil, 'writing the request failed: ' .. err, code\n"
    "      end\n"
    "      return nil, rerr, rcode\n"
    "    end\n"
    "  end\n"
    "  return res\n"
    "end\n"
    "\n"
    "-- Sends a head built elsewhere (req:forward_head) on the connected\n"
    "-- sock, streams the body from body_reader as mode says, and reads\n"
    "-- the response head. Returns the response, or nil, message, code.\n"
    "-- The steps after the connect are those of request, except that a\n"
    "-- body is sent from a coroutine of its own while this one reads: an\n"
    "-- answer the upstream sends before it has the whole body (a 413 or a\n"
    "-- 401) is returned at once, with true as a second value. A failure of\n"
    "-- the upstream while the body is still going out returns nil,\n"
    "-- message, code, true. In both cases the body's coroutine ends when\n"
    "-- its next read or write fails, and the client's connection must not\n"
    "-- carry another request.\n"
    "local function exchange(sock, head, mode, length, body_reader, is_head,\n"
    "  request_close, timeout, max_headers)\n"
    "  timeout = timeout or default_timeout\n"
    "  if type(timeout) ~= 'number' or timeout < 0 then\n"
    "    error('timeout must be a number >= 0', 2)\n"
    "  end\n"
    "  sock:settimeout(timeout)\n"
    "  local ok, err, code = sock:write(head)\n"
    "  local res = new_response(sock, is_head, request_close, nil,\n"
    "    max_headers)\n"
    "  if ok and (mode == 'chunked' or mode == 'length') then\n"
    "    core = core or require('justavps.core')\n"
    "    -- client_failed: what body_reader raised (the client's body "
    "failed).\n"
    "    local sent = { done = false }\n"
    "    local reading = true\n"
    "    local function read_client()\n"
    "      local rok, data = pcall(body_reader)\n"
    "      if not rok then\n"
    "        -- Raised on, so that a chunked body gets no last chunk.\n"
    "        sent.client_failed = data\n"
    "        error(data, 0)\n"
    "      end\n"
    "      return data\n"
    "    end\n"
    "    core.spawn(function()\n"
    "      -- A write raises once the socket is closed under it: the upstream\n"
    "      -- side failed, and the reader reports that.\n"
    "      local ran, sok, serr, scode = pcall(send_body, sock, read_client,\n"
    "        mode == 'chunked', length)\n"
    "      sent.done, sent.ran = true, ran\n"
    "      sent.ok, sent.err, sent.code = sok, serr, scode\n"
    "      -- A body that cannot be completed ends the head read too.\n"
    "      if reading and not sock:closed() and (sent.client_failed\n"
    "          or (ran and (sok == false\n"
    "            or (not sok and not peer_gone[scode])))) then\n"
    "        sock:close()\n"
    "      end\n"
    "      if sent.waiter then\n"
    "        sent.waiter:wake()\n"
    "      end\n"
    "    end)\n"
    "    while not res:_head_done() do\n"
    "      local filled, rerr, rcode = false, 'connection closed', 'closed'\n"
    "      if not sock:closed() then\n"
    "        filled, rerr, rcode = fill(res, sock)\n"
    "      end\n"
    "      if not filled and res:_head_done() then\n"
    "        break\n"
    "      elseif not filled then\n"
    "        reading = false\n"
    "        if sent.client_failed then\n"
    "          sock:close()\n"
    "          error(sent.client_failed, 0)\n"
    "        elseif not sent.done then\n"
    "          return nil, rerr, rcode, true\n"
    "        elseif sent.ran and sent.ok == false then\n"
    "          sock:close()\n"
    "          error(sent.err, 2)\n"
    "        elseif sent.ran and not sent.ok then\n"
    "          sock:close()\n"
    "          return nil, 'writing the request failed: ' .. sent.err, "
    "sent.code\n"
    "        end\n"
    "        return nil, rerr, rcode\n"
    "      end\n"
    "    end\n"
    "    reading = false\n"
    "    if not sent.done then\n"
    "      res:_block_reuse()\n"
    "      return res, true\n"
    "    elseif sent.client_failed then\n"
    "      sock:close()\n"
    "      error(sent.client_failed, 0)\n"
    "    elseif sent.ran and sent.ok == false then\n"
    "      sock:close()\n"
    "      error(sent.err, 2)\n"
    "    elseif not sent.ran or not sent.ok then\n"
    "      res:_block_reuse()\n"
    "    end\n"
    "    return res\n"
    "  end\n"
    "  if not ok and not peer_gone[code] then\n"
    "    sock:close()\n"
    "    return nil, 'writing the request failed: ' .. err, code\n"
    "  end\n"
    "  if not ok then\n"
    "    res:_block_reuse()\n"
    "  end\n"
    "  while not res:_head_done() do\n"
    "    local filled, rerr, rcode = fill(res, sock)\n"
    "    if not filled and res:_head_done() then\n"
    "      break\n"
    "    elseif not filled then\n"
    "      if not ok then\n"
    "        return nil, 'writing the request failed: ' .. err, code\n"
    "      end\n"
    "      return nil, rerr, rcode\n"
    "    end\n"
    "  end\n"
    "  return res\n"
    "end\n"
    "\n"
    "return request, read, read_body, exchange\n";


void
jv__http_client_register(lua_State *L, int table_index)
{
  static const luaL_Reg methods[] = {
    { "header", l_response_header },
    { "headers", l_response_headers },
    { "header_list", l_response_header_list },
    { "relay_head", l_response_relay_head },
    { "relay", l_response_relay },
    { "keepalive", l_response_keepalive },
    { "socket", l_response_socket },
    { "close", l_response_close },
    { "_feed", l_response_feed },
    { "_take", l_response_take },
    { "_fail", l_response_fail },
    { "_block_reuse", l_response_block_reuse },
    { "_head_done", l_response_head_done },
    { "_content_length", l_response_content_length },
    { "_conn", l_response_conn },
    { NULL, NULL }
  };
  int methods_index;

  llhttp_settings_init(&response_settings);
  response_settings.on_message_begin = on_message_begin;
  response_settings.on_status = on_status;
  response_settings.on_header_field = on_header_field;
  response_settings.on_header_value = on_header_value;
  response_settings.on_headers_complete = on_headers_complete;
  response_settings.on_body = on_body;
  response_settings.on_message_complete = on_message_complete;

  luaL_newmetatable(L, JV_HTTP_RESPONSE_MT);
  lua_pushcfunction(L, l_response_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  methods_index = lua_gettop(L);

  if (luaL_loadbuffer(L, client_lua, sizeof(client_lua) - 1,
                      "=core.http client") != 0) {
    lua_error(L);
    return;
  }

  lua_pushcfunction(L, l_build_request);
  lua_pushcfunction(L, l_response_new);
  lua_pushinteger(L, CLIENT_READ_SIZE);
  lua_pushinteger(L, CLIENT_TIMEOUT);
  lua_pushinteger(L, CLIENT_MAX_BODY);
  lua_call(L, 5, 4);

  /* core.http._exchange: for lua/justavps/proxy.lua only, not public. */
  lua_setfield(L, table_index, "_exchange");
  lua_setfield(L, methods_index, "read_body");
  lua_setfield(L, methods_index, "read");
  lua_setfield(L, table_index, "request");

  /* Methods are found in the table by a Lua __index, and only status,
   * version and reason cost a call into C. */
  luaL_getmetatable(L, JV_HTTP_RESPONSE_MT);
  if (luaL_loadbuffer(L, jv__http_index_src, jv__http_index_src_len,
                      "=http response") != 0) {
    lua_error(L);
  }
  lua_pushvalue(L, methods_index);
  lua_pushcfunction(L, l_response_index);
  lua_call(L, 2, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);

  luaL_unref(L, LUA_REGISTRYINDEX, l_response_methods_ref);
  l_response_methods_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}
