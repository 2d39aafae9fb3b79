/*
 * curl.c: an asynchronous HTTP(S) client on libcurl's multi interface
 * (core.curl).
 *
 * One CURLM runs every transfer of the process. libcurl names the sockets
 * to watch (CURLMOPT_SOCKETFUNCTION, one uv_poll_t each) and when it wants
 * to be called back (CURLMOPT_TIMERFUNCTION, one uv_timer_t), and libuv
 * events go back to it through curl_multi_socket_action. The calling
 * coroutine stays parked for the whole transfer and is resumed with the
 * response once curl_multi_info_read reports the transfer done. Unlike
 * core.http.request, libcurl resolves host names. Debian's libcurl does
 * that on a resolver thread, so the loop does not wait for getaddrinfo.
 */
#include "internal.h"

#include "dynlib_curl.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define JV_CURL_DEFAULT_TIMEOUT         30.0
#define JV_CURL_DEFAULT_CONNECT_TIMEOUT 10.0
#define JV_CURL_DEFAULT_MAX_BODY        (16 * 1024 * 1024)
#define JV_CURL_DEFAULT_MAX_REDIRECTS   5

/* Bytes of response header lines kept for one response. libcurl limits a
 * single line (100 KiB in 7.88) but not their sum. */
#define JV_CURL_MAX_HEADER_BYTES (256 * 1024)

/* The largest timeout in seconds: a year, far below LONG_MAX ms. */
#define JV_CURL_MAX_TIMEOUT (365.0 * 24 * 3600)

#define JV_CURL_USER_AGENT "justavps/" JV_VERSION

typedef struct {
  char *data;
  size_t len;
  size_t cap;
} jv_curl_buf_t;

/* One transfer, from the call until its coroutine is resumed. */
typedef struct {
  CURL *easy;
  int ref; /* the parked coroutine */
  struct curl_slist *headers;
  char *body; /* a copy of the request body, or NULL */
  size_t body_len;
  size_t max_body;
  int length_checked; /* Content-Length of this response checked */
  jv_curl_buf_t response_body;
  jv_curl_buf_t response_headers; /* lines of the last response head */
  int head_done;                  /* the blank line after the head came */
  int failure; /* set by a callback that aborted the transfer */
  char errbuf[CURL_ERROR_SIZE];
} jv_curl_req_t;

/* Why a callback aborted a transfer. libcurl then reports only
 * CURLE_WRITE_ERROR, which does not name the cause. */
enum {
  FAILURE_NONE = 0,
  FAILURE_BODY_TOO_LARGE,
  FAILURE_LENGTH_TOO_LARGE,
  FAILURE_HEADERS_TOO_LARGE,
  FAILURE_NO_MEMORY,
};

/* A socket libcurl asked to watch, freed by its close callback. */
typedef struct {
  uv_poll_t poll;
  curl_socket_t fd;
} jv_curl_sock_t;

static struct {
  CURLM *multi;
  uv_timer_t timer;
  /* Started while transfers are in flight: the poll handles and the timer
   * are unreferenced, so this check handle is what keeps the loop alive
   * for a transfer and lets a program end when none is left. */
  uv_check_t keepalive;
  unsigned in_flight;
} curl_state;

static const char *const known_options[] = {
  "method",          "url",      "headers", "body",   "timeout",
  "connect_timeout", "max_body", "ca_file", "verify", "follow",
  "max_redirects",   "reuse",    NULL
};


/* ---- buffers ---- */

static int
buf_append(jv_curl_buf_t *b, const char *data, size_t len)
{
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    char *p;

    while (cap < b->len + len) {
      cap *= 2;
    }

    p = realloc(b->data, cap);
    if (p == NULL) {
      return -1;
    }

    b->data = p;
    b->cap = cap;
  }

  memcpy(b->data + b->len, data, len);
  b->len += len;
  return 0;
}


static void
buf_free(jv_curl_buf_t *b)
{
  free(b->data);
  b->data = NULL;
  b->len = 0;
  b->cap = 0;
}


static void
req_free(jv_curl_req_t *req)
{
  if (req->easy != NULL) {
    curl_easy_cleanup(req->easy);
  }

  curl_slist_free_all(req->headers);
  free(req->body);
  buf_free(&req->response_body);
  buf_free(&req->response_headers);
  free(req);
}


/* ---- libcurl callbacks for one transfer ---- */

static size_t
write_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
  jv_curl_req_t *req = userdata;
  size_t len = size * nmemb;
  curl_off_t length = -1;

  /* A Content-Length over the limit fails at the first body bytes instead
   * of after max_body of them. This check is here and not in
   * CURLOPT_MAXFILESIZE, because libcurl 7.88 applies that one to a HEAD
   * response and to a redirect it follows, whose bodies are not kept. */
  if (!req->length_checked) {
    req->length_checked = 1;
    curl_easy_getinfo(req->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
    if (length > 0 && (curl_off_t) req->max_body < length) {
      req->failure = FAILURE_LENGTH_TOO_LARGE;
      return 0;
    }
  }

  if (len > req->max_body || req->response_body.len > req->max_body - len) {
    req->failure = FAILURE_BODY_TOO_LARGE;
    return 0;
  }

  if (buf_append(&req->response_body, data, len) != 0) {
    req->failure = FAILURE_NO_MEMORY;
    return 0;
  }

  return len;
}


/* Receives each header line of each response, status lines included.
 * Only the head of the last response is kept: a status line starts a new
 * one, which drops a redirect's or a 100 Continue's head, and lines after
 * the blank line that ends a head are trailers, which are dropped. */
static size_t
header_cb(char *data, size_t size, size_t nmemb, void *userdata)
{
  jv_curl_req_t *req = userdata;
  jv_curl_buf_t *b = &req->response_headers;
  size_t total = size * nmemb;
  size_t len = total;

  while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r')) {
    len--;
  }

  if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
    b->len = 0;
    req->response_body.len = 0;
    req->length_checked = 0;
    req->head_done = 0;
    return total;
  }

  if (len == 0) {
    req->head_done = 1;
    return total;
  }

  if (req->head_done) {
    return total;
  }

  if (b->len + len + 1 > JV_CURL_MAX_HEADER_BYTES) {
    req->failure = FAILURE_HEADERS_TOO_LARGE;
    return 0;
  }

  /* A folded continuation line (obsolete, but legal in HTTP/1.1) joins
   * the previous line with a space in place of the line break. */
  if ((data[0] == ' ' || data[0] == '\t') && b->len > 0) {
    b->data[b->len - 1] = ' ';
  }

  if (buf_append(b, data, len) != 0 || buf_append(b, "\n", 1) != 0) {
    req->failure = FAILURE_NO_MEMORY;
    return 0;
  }

  return total;
}


/* ---- completing a transfer ---- */

static const char *
result_code(CURLcode rc)
{
  switch (rc) {
  case CURLE_OPERATION_TIMEDOUT:
    return "timeout";

  case CURLE_COULDNT_RESOLVE_HOST:
    return "resolve_failed";

  case CURLE_COULDNT_CONNECT:
    return "connect_failed";

  case CURLE_SSL_CONNECT_ERROR:
  case CURLE_SSL_ENGINE_NOTFOUND:
  case CURLE_SSL_ENGINE_SETFAILED:
  case CURLE_SSL_CERTPROBLEM:
  case CURLE_SSL_CIPHER:
  case CURLE_PEER_FAILED_VERIFICATION:
  case CURLE_USE_SSL_FAILED:
  case CURLE_SSL_ENGINE_INITFAILED:
  case CURLE_SSL_CACERT_BADFILE:
  case CURLE_SSL_SHUTDOWN_FAILED:
  case CURLE_SSL_CRL_BADFILE:
  case CURLE_SSL_ISSUER_ERROR:
  case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
  case CURLE_SSL_INVALIDCERTSTATUS:
  case CURLE_SSL_CLIENTCERT:
    return "tls_error";

  case CURLE_UNSUPPORTED_PROTOCOL:
  case CURLE_WEIRD_SERVER_REPLY:
  case CURLE_HTTP2:
  case CURLE_HTTP2_STREAM:
  case CURLE_BAD_CONTENT_ENCODING:
    return "protocol_error";

  default:
    return "curl_error";
  }
}


static int
push_failure(lua_State *co, const char *message, const char *code)
{
  lua_pushnil(co);
  lua_pushstring(co, message);
  lua_pushstring(co, code);
  return 3;
}


/* Pushes nil, message, code for a transfer that ended with rc. */
static int
push_result_error(lua_State *co, jv_curl_req_t *req, CURLcode rc)
{
  switch (req->failure) {
  case FAILURE_BODY_TOO_LARGE:
    lua_pushnil(co);
    lua_pushfstring(co, "response body exceeds max_body (%f bytes)",
                    (lua_Number) req->max_body);
    lua_pushstring(co, "too_large");
    return 3;

  case FAILURE_HEADERS_TOO_LARGE:
    lua_pushnil(co);
    lua_pushfstring(co, "response headers exceed %d bytes",
                    JV_CURL_MAX_HEADER_BYTES);
    lua_pushstring(co, "too_large");
    return 3;

  case FAILURE_LENGTH_TOO_LARGE:
    lua_pushnil(co);
    lua_pushfstring(co, "response Content-Length exceeds max_body (%f bytes)",
                    (lua_Number) req->max_body);
    lua_pushstring(co, "too_large");
    return 3;

  case FAILURE_NO_MEMORY:
    return push_failure(co, "out of memory reading the response", "no_memory");
  }

  return push_failure(
      co, req->errbuf[0] != '\0' ? req->errbuf : curl_easy_strerror(rc),
      result_code(rc));
}


/* Sets t[name] = value where t is at the top of co's stack; a name seen
 * before turns into an array of its values in order. */
static void
add_header(lua_State *co, const char *name, size_t name_len, const char *value,
           size_t value_len)
{
  lua_pushlstring(co, name, name_len);
  lua_pushvalue(co, -1);
  lua_rawget(co, -3);

  switch (lua_type(co, -1)) {
  case LUA_TNIL:
    lua_pop(co, 1);
    lua_pushlstring(co, value, value_len);
    lua_rawset(co, -3);
    break;

  case LUA_TSTRING:
    lua_createtable(co, 2, 0);
    lua_insert(co, -2);
    lua_rawseti(co, -2, 1);
    lua_pushlstring(co, value, value_len);
    lua_rawseti(co, -2, 2);
    lua_rawset(co, -3);
    break;

  default:
    lua_pushlstring(co, value, value_len);
    lua_rawseti(co, -2, (int) lua_objlen(co, -2) + 1);
    lua_pop(co, 2);
    break;
  }
}


/* Pushes a table of the kept header lines: lowercase name to value, or to
 * an array of values for a name sent more than once. Lowercases the
 * names in the buffer, which is not used afterwards. */
static void
push_headers(lua_State *co, jv_curl_buf_t *b)
{
  char *p = b->data, *end = b->data + b->len;

  lua_newtable(co);

  while (p < end) {
    char *eol = memchr(p, '\n', (size_t) (end - p));
    char *colon = memchr(p, ':', (size_t) (eol - p));
    char *value, *value_end, *c;

    if (colon == NULL || colon == p) {
      p = eol + 1;
      continue;
    }

    for (c = p; c < colon; c++) {
      *c = (char) tolower((unsigned char) *c);
    }

    value = colon + 1;
    value_end = eol;
    while (value < value_end && (*value == ' ' || *value == '\t')) {
      value++;
    }
    while (value_end > value &&
           (value_end[-1] == ' ' || value_end[-1] == '\t' ||
            value_end[-1] == '\r')) {
      value_end--;
    }

    add_header(co, p, (size_t) (colon - p), value,
               (size_t) (value_end - value));
    p = eol + 1;
  }
}


static void
set_time(lua_State *co, CURL *easy, CURLINFO info, const char *name)
{
  curl_off_t us = 0;

  curl_easy_getinfo(easy, info, &us);
  lua_pushnumber(co, (double) us / 1e6);
  lua_setfield(co, -2, name);
}


static void
push_timing(lua_State *co, CURL *easy)
{
  lua_createtable(co, 0, 7);
  set_time(co, easy, CURLINFO_NAMELOOKUP_TIME_T, "namelookup");
  set_time(co, easy, CURLINFO_CONNECT_TIME_T, "connect");
  set_time(co, easy, CURLINFO_APPCONNECT_TIME_T, "appconnect");
  set_time(co, easy, CURLINFO_PRETRANSFER_TIME_T, "pretransfer");
  set_time(co, easy, CURLINFO_STARTTRANSFER_TIME_T, "starttransfer");
  set_time(co, easy, CURLINFO_REDIRECT_TIME_T, "redirect");
  set_time(co, easy, CURLINFO_TOTAL_TIME_T, "total");
}


static const char *
version_name(long version)
{
  switch (version) {
  case CURL_HTTP_VERSION_1_0:
    return "1.0";
  case CURL_HTTP_VERSION_1_1:
    return "1.1";
  case CURL_HTTP_VERSION_2_0:
    return "2";
  case CURL_HTTP_VERSION_3:
    return "3";
  default:
    return "unknown";
  }
}


static int
push_response(lua_State *co, jv_curl_req_t *req)
{
  CURL *easy = req->easy;
  long status = 0, version = 0, redirects = 0;
  char *url = NULL;

  curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(easy, CURLINFO_HTTP_VERSION, &version);
  curl_easy_getinfo(easy, CURLINFO_REDIRECT_COUNT, &redirects);
  curl_easy_getinfo(easy, CURLINFO_EFFECTIVE_URL, &url);

  lua_createtable(co, 0, 7);
  lua_pushinteger(co, (lua_Integer) status);
  lua_setfield(co, -2, "status");
  lua_pushstring(co, version_name(version));
  lua_setfield(co, -2, "version");
  push_headers(co, &req->response_headers);
  lua_setfield(co, -2, "headers");
  lua_pushlstring(co, req->response_body.data ? req->response_body.data : "",
                  req->response_body.len);
  lua_setfield(co, -2, "body");
  lua_pushstring(co, url ? url : "");
  lua_setfield(co, -2, "effective_url");
  lua_pushinteger(co, (lua_Integer) redirects);
  lua_setfield(co, -2, "redirects");
  push_timing(co, easy);
  lua_setfield(co, -2, "timing");
  return 1;
}


static void
keepalive_cb(uv_check_t *check)
{
}


static void
transfer_finish(jv_curl_req_t *req, CURLcode rc)
{
  int ref = req->ref;
  lua_State *co = jv__co_thread(ref);
  int nargs;

  lua_checkstack(co, 8);
  if (rc == CURLE_OK && req->failure == FAILURE_NONE) {
    nargs = push_response(co, req);

  } else {
    nargs = push_result_error(co, req, rc);
  }

  curl_multi_remove_handle(curl_state.multi, req->easy);
  req_free(req);

  if (--curl_state.in_flight == 0) {
    uv_check_stop(&curl_state.keepalive);
  }

  jv__co_resume(ref, nargs);
}


/* Completes every transfer libcurl reports done. Called after each
 * curl_multi_socket_action, never from inside a libcurl callback. */
static void
check_done(void)
{
  CURLMsg *msg;
  int left;

  while ((msg = curl_multi_info_read(curl_state.multi, &left)) != NULL) {
    CURL *easy = msg->easy_handle;
    CURLcode rc = msg->data.result;
    jv_curl_req_t *req = NULL;

    if (msg->msg != CURLMSG_DONE) {
      continue;
    }

    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &req);
    transfer_finish(req, rc);
  }
}


/* ---- libcurl multi callbacks: sockets and the timer ---- */

static void
socket_action(curl_socket_t fd, int events)
{
  int running;

  curl_multi_socket_action(curl_state.multi, fd, events, &running);
  check_done();
}


static void
poll_cb(uv_poll_t *handle, int status, int events)
{
  jv_curl_sock_t *sock = handle->data;
  int flags = 0;

  if (status < 0) {
    flags = CURL_CSELECT_ERR;

  } else {
    if (events & UV_READABLE) {
      flags |= CURL_CSELECT_IN;
    }
    if (events & UV_WRITABLE) {
      flags |= CURL_CSELECT_OUT;
    }
  }

  /* libcurl may remove this socket meanwhile; sock stays valid until its
   * close callback, which runs later in the loop, and is not used here. */
  socket_action(sock->fd, flags);
}


static void
sock_close_cb(uv_handle_t *handle)
{
  free(handle->data);
}


static int
socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
  jv_curl_sock_t *sock = socketp;
  int events = 0;
  int rc;

  if (what == CURL_POLL_REMOVE) {
    if (sock != NULL) {
      curl_multi_assign(curl_state.multi, fd, NULL);
      uv_close((uv_handle_t *) &sock->poll, sock_close_cb);
    }
    return 0;
  }

  if (sock == NULL) {
    sock = malloc(sizeof(*sock));
    if (sock == NULL) {
      jv_log(JV_LOG_ERR, "curl: out of memory watching a socket", NULL);
      return -1;
    }

    rc = uv_poll_init_socket(jv__loop(), &sock->poll, fd);
    if (rc != 0) {
      jv_log(JV_LOG_ERR, "curl: uv_poll_init_socket failed", "error",
             uv_strerror(rc), NULL);
      free(sock);
      return -1;
    }

    sock->fd = fd;
    sock->poll.data = sock;
    uv_unref((uv_handle_t *) &sock->poll);
    curl_multi_assign(curl_state.multi, fd, sock);
  }

  if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) {
    events |= UV_READABLE;
  }
  if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) {
    events |= UV_WRITABLE;
  }

  rc = uv_poll_start(&sock->poll, events, poll_cb);
  if (rc != 0) {
    jv_log(JV_LOG_ERR, "curl: uv_poll_start failed", "error", uv_strerror(rc),
           NULL);
    return -1;
  }

  return 0;
}


static void
timer_cb(uv_timer_t *timer)
{
  socket_action(CURL_SOCKET_TIMEOUT, 0);
}


/* Sets the one timeout libcurl keeps: -1 cancels it, and 0 requests a call
 * as soon as possible. The timer then fires on the next loop iteration,
 * because socket_action must not be called from inside this callback. */
static int
timer_set_cb(CURLM *multi, long timeout_ms, void *userp)
{
  if (timeout_ms < 0) {
    uv_timer_stop(&curl_state.timer);

  } else {
    uv_timer_start(&curl_state.timer, timer_cb, (uint64_t) timeout_ms, 0);
  }

  return 0;
}


/* Creates the process's CURLM on first use, so that programs that never
 * make a request do not initialise libcurl. */
static int
multi_init(void)
{
  if (curl_state.multi != NULL) {
    return 0;
  }

  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    return -1;
  }

  curl_state.multi = curl_multi_init();
  if (curl_state.multi == NULL) {
    return -1;
  }

  curl_multi_setopt(curl_state.multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
  curl_multi_setopt(curl_state.multi, CURLMOPT_TIMERFUNCTION, timer_set_cb);

  uv_timer_init(jv__loop(), &curl_state.timer);
  uv_unref((uv_handle_t *) &curl_state.timer);
  uv_check_init(jv__loop(), &curl_state.keepalive);
  return 0;
}


/* ---- reading the options ---- */

static void
check_known_options(lua_State *L, int idx)
{
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *name;
    int i;

    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L, "bad options to core.curl.request: keys must be option "
                    "names (strings)");
    }

    name = lua_tostring(L, -1);
    for (i = 0; known_options[i] != NULL; i++) {
      if (strcmp(name, known_options[i]) == 0) {
        break;
      }
    }

    if (known_options[i] == NULL) {
      luaL_error(L, "unknown option '%s' to core.curl.request", name);
    }
  }
}


/* Returns options[name] as a string, or def when it is nil. */
static const char *
opt_string(lua_State *L, int idx, const char *name, const char *def,
           size_t *len)
{
  const char *s;

  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    if (len != NULL) {
      *len = def ? strlen(def) : 0;
    }
    return def;
  }

  if (lua_type(L, -1) != LUA_TSTRING) {
    luaL_error(L,
               "bad option '%s' to core.curl.request (string expected, "
               "got %s)",
               name, luaL_typename(L, -1));
  }

  /* The options table keeps the string alive after the pop. */
  s = lua_tolstring(L, -1, len);
  lua_pop(L, 1);
  return s;
}


static double
opt_number(lua_State *L, int idx, const char *name, double def, double max)
{
  double n;

  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }

  if (lua_type(L, -1) != LUA_TNUMBER) {
    luaL_error(L,
               "bad option '%s' to core.curl.request (number expected, "
               "got %s)",
               name, luaL_typename(L, -1));
  }

  n = lua_tonumber(L, -1);
  lua_pop(L, 1);

  if (!(n >= 0 && n <= max)) {
    luaL_error(L,
               "bad option '%s' to core.curl.request (must be between 0 "
               "and %f, got %f)",
               name, max, n);
  }

  return n;
}


static int
opt_boolean(lua_State *L, int idx, const char *name, int def)
{
  int b;

  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return def;
  }

  if (lua_type(L, -1) != LUA_TBOOLEAN) {
    luaL_error(L,
               "bad option '%s' to core.curl.request (boolean expected, "
               "got %s)",
               name, luaL_typename(L, -1));
  }

  b = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return b;
}


/* Converts seconds to libcurl's milliseconds; 0 stays 0 (no limit), and
 * anything above 0 is at least 1 ms. */
static long
seconds_to_ms(double seconds)
{
  long ms = (long) (seconds * 1000.0);

  return (seconds > 0 && ms == 0) ? 1 : ms;
}


static int
is_token_char(unsigned char c)
{
  return isalnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}


static void
check_method(lua_State *L, const char *method, size_t len)
{
  size_t i;

  if (len == 0) {
    luaL_error(L, "bad option 'method' to core.curl.request (empty)");
  }

  for (i = 0; i < len; i++) {
    if (!is_token_char((unsigned char) method[i])) {
      luaL_error(L, "bad option 'method' to core.curl.request (not an HTTP "
                    "token)");
    }
  }

  if (strcmp(method, "CONNECT") == 0) {
    luaL_error(L, "bad option 'method' to core.curl.request (CONNECT is not "
                  "supported)");
  }
}


/* Raises unless the value at the top of L is a string or number that can
 * go into a header line. */
static void
check_header_value(lua_State *L, const char *name)
{
  const char *value;
  size_t len, i;

  if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
    luaL_error(L,
               "bad header '%s' to core.curl.request (string or number "
               "expected, got %s)",
               name, luaL_typename(L, -1));
  }

  /* lua_tolstring would turn a number into a string in place, which is
   * harmless for a value but done on a copy to keep the table as given. */
  lua_pushvalue(L, -1);
  value = lua_tolstring(L, -1, &len);
  for (i = 0; i < len; i++) {
    if (value[i] == '\r' || value[i] == '\n' || value[i] == '\0') {
      luaL_error(L,
                 "bad header '%s' to core.curl.request (value contains "
                 "CR, LF or NUL)",
                 name);
    }
  }
  lua_pop(L, 1);
}


/* Caller's headers that replace what append_defaults would add. */
enum {
  HEADER_CONTENT_TYPE = 1,
  HEADER_EXPECT = 2,
};


/* Checks every header, raising on misuse, and returns the HEADER_ flags
 * of the names present. */
static int
check_headers(lua_State *L, int idx)
{
  int seen = 0;

  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *name;
    size_t len, i;

    if (lua_type(L, -2) != LUA_TSTRING) {
      luaL_error(L, "bad option 'headers' to core.curl.request (keys must be "
                    "header names)");
    }

    name = lua_tolstring(L, -2, &len);
    for (i = 0; i < len; i++) {
      if (!is_token_char((unsigned char) name[i])) {
        break;
      }
    }

    if (len == 0 || i < len) {
      luaL_error(L,
                 "bad header name '%s' to core.curl.request (not an HTTP "
                 "token)",
                 name);
    }

    if (strcasecmp(name, "content-length") == 0 ||
        strcasecmp(name, "transfer-encoding") == 0) {
      luaL_error(L,
                 "bad header '%s' to core.curl.request (the client frames "
                 "the body itself)",
                 name);
    }

    if (strcasecmp(name, "content-type") == 0) {
      seen |= HEADER_CONTENT_TYPE;
    } else if (strcasecmp(name, "expect") == 0) {
      seen |= HEADER_EXPECT;
    }

    if (lua_type(L, -1) == LUA_TTABLE) {
      int n = (int) lua_objlen(L, -1), j;

      for (j = 1; j <= n; j++) {
        lua_rawgeti(L, -1, j);
        check_header_value(L, name);
        lua_pop(L, 1);
      }

    } else {
      check_header_value(L, name);
    }

    lua_pop(L, 1);
  }

  return seen;
}


/* Appends "name: value" to the list. An empty value uses libcurl's
 * "name;" form, because libcurl drops a header given as "name:". */
static int
append_header(struct curl_slist **list, const char *name, const char *value,
              size_t value_len)
{
  struct curl_slist *next;
  size_t name_len = strlen(name);
  char *line = malloc(name_len + value_len + 3);

  if (line == NULL) {
    return -1;
  }

  memcpy(line, name, name_len);
  if (value_len == 0) {
    line[name_len] = ';';
    line[name_len + 1] = '\0';

  } else {
    line[name_len] = ':';
    line[name_len + 1] = ' ';
    memcpy(line + name_len + 2, value, value_len);
    line[name_len + 2 + value_len] = '\0';
  }

  next = curl_slist_append(*list, line);
  free(line);
  if (next == NULL) {
    return -1;
  }

  *list = next;
  return 0;
}


static int
append_header_value(lua_State *L, struct curl_slist **list, const char *name)
{
  const char *value;
  size_t len;
  int rc;

  lua_pushvalue(L, -1);
  value = lua_tolstring(L, -1, &len);
  rc = append_header(list, name, value, len);
  lua_pop(L, 1);
  return rc;
}


/* Appends "Name:" lines, which remove headers libcurl would add: its form
 * Content-Type for a body, and Expect: 100-continue, which delays a large
 * body by up to a second (CURLOPT_EXPECT_100_TIMEOUT_MS) when the server
 * sends no 100 Continue. A header of the caller's own wins. */
static int
append_defaults(int seen, int has_body, struct curl_slist **list)
{
  if (has_body && !(seen & HEADER_CONTENT_TYPE)) {
    struct curl_slist *next = curl_slist_append(*list, "Content-Type:");

    if (next == NULL) {
      return -1;
    }
    *list = next;
  }

  if (!(seen & HEADER_EXPECT)) {
    struct curl_slist *next = curl_slist_append(*list, "Expect:");

    if (next == NULL) {
      return -1;
    }
    *list = next;
  }

  return 0;
}


/* Builds the header list from the headers at idx (a table that
 * check_headers accepted, or nil), so nothing here raises. Returns 0 or
 * -1 when out of memory. */
static int
build_headers(lua_State *L, int idx, int seen, int has_body,
              struct curl_slist **list)
{
  if (!lua_istable(L, idx)) {
    return append_defaults(seen, has_body, list);
  }

  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *name = lua_tostring(L, -2);
    int rc = 0;

    if (lua_type(L, -1) == LUA_TTABLE) {
      int n = (int) lua_objlen(L, -1), j;

      for (j = 1; j <= n && rc == 0; j++) {
        lua_rawgeti(L, -1, j);
        rc = append_header_value(L, list, name);
        lua_pop(L, 1);
      }

    } else {
      rc = append_header_value(L, list, name);
    }

    lua_pop(L, 1);
    if (rc != 0) {
      lua_pop(L, 1);
      return -1;
    }
  }

  return append_defaults(seen, has_body, list);
}


/* Returns NULL when url is an absolute http or https URL, else a message
 * for the caller; *code is set to the failure's code. */
static const char *
check_url(const char *url, char *message, size_t size, const char **code)
{
  CURLU *u = curl_url();
  CURLUcode uc;
  char *scheme = NULL;

  if (u == NULL) {
    *code = "no_memory";
    return "out of memory parsing the URL";
  }

  uc = curl_url_set(u, CURLUPART_URL, url, 0);
  if (uc == CURLUE_UNSUPPORTED_SCHEME) {
    *code = "protocol_error";
    snprintf(message, size,
             "unsupported URL scheme: only http and https "
             "are allowed");

  } else if (uc != CURLUE_OK) {
    *code = "curl_error";
    snprintf(message, size, "invalid URL: %s", curl_url_strerror(uc));

  } else if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK) {
    *code = "curl_error";
    snprintf(message, size, "invalid URL: no scheme");

  } else if (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) {
    *code = "protocol_error";
    snprintf(message, size,
             "unsupported URL scheme '%s': only http and https are allowed",
             scheme);

  } else {
    message = NULL;
  }

  curl_free(scheme);
  curl_url_cleanup(u);
  return message;
}


/* ---- core.curl.request ---- */

typedef struct {
  const char *method;
  const char *url;
  const char *body;
  size_t body_len;
  const char *ca_file;
  double timeout;
  double connect_timeout;
  double max_body;
  double max_redirects;
  int verify;
  int follow;
  int reuse;
  int has_headers;
  int header_flags;
} jv_curl_opts_t;


/* Reads and checks every option, raising on misuse. */
static void
read_options(lua_State *L, jv_curl_opts_t *o)
{
  size_t len, i;

  luaL_checktype(L, 1, LUA_TTABLE);
  check_known_options(L, 1);

  o->url = opt_string(L, 1, "url", NULL, &len);
  if (o->url == NULL) {
    luaL_error(L, "bad options to core.curl.request (url is required)");
  }
  for (i = 0; i < len; i++) {
    if (o->url[i] == '\0') {
      luaL_error(L, "bad option 'url' to core.curl.request (contains NUL)");
    }
  }

  o->method = opt_string(L, 1, "method", "GET", &len);
  check_method(L, o->method, len);

  o->body = opt_string(L, 1, "body", NULL, &o->body_len);
  o->ca_file = opt_string(L, 1, "ca_file", NULL, &len);
  if (o->ca_file != NULL && strlen(o->ca_file) != len) {
    luaL_error(L, "bad option 'ca_file' to core.curl.request (contains "
                  "NUL)");
  }

  o->timeout =
      opt_number(L, 1, "timeout", JV_CURL_DEFAULT_TIMEOUT, JV_CURL_MAX_TIMEOUT);
  o->connect_timeout =
      opt_number(L, 1, "connect_timeout", JV_CURL_DEFAULT_CONNECT_TIMEOUT,
                 JV_CURL_MAX_TIMEOUT);
  o->max_body = floor(opt_number(L, 1, "max_body", JV_CURL_DEFAULT_MAX_BODY,
                                 9007199254740992.0));
  o->max_redirects = floor(
      opt_number(L, 1, "max_redirects", JV_CURL_DEFAULT_MAX_REDIRECTS, 1000));
  o->verify = opt_boolean(L, 1, "verify", 1);
  o->follow = opt_boolean(L, 1, "follow", 0);
  o->reuse = opt_boolean(L, 1, "reuse", 1);

  o->has_headers = 0;
  o->header_flags = 0;
  lua_getfield(L, 1, "headers");
  if (lua_type(L, -1) == LUA_TTABLE) {
    o->has_headers = 1;
    o->header_flags = check_headers(L, lua_gettop(L));

  } else if (!lua_isnil(L, -1)) {
    luaL_error(L,
               "bad option 'headers' to core.curl.request (table "
               "expected, got %s)",
               luaL_typename(L, -1));
  }
  lua_pop(L, 1);
}


/* Sets the request body and method. POST uses libcurl's own POST, so a
 * followed 301, 302 or 303 turns it into a GET as browsers do. Any other
 * method is sent as CURLOPT_CUSTOMREQUEST, which redirects keep. */
static void
setup_method(CURL *easy, jv_curl_req_t *req, const jv_curl_opts_t *o)
{
  int is_post = strcmp(o->method, "POST") == 0;

  if (strcmp(o->method, "HEAD") == 0) {
    curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);

  } else if (!is_post && strcmp(o->method, "GET") != 0) {
    curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, o->method);
  }

  if (req->body != NULL || is_post) {
    curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE,
                     (curl_off_t) req->body_len);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, req->body ? req->body : "");
  }

  /* Without this, libcurl drops the body of a custom method on a 301,
   * 302 or 303 but keeps the method: a PUT would arrive empty. */
  if (!is_post && req->body != NULL) {
    curl_easy_setopt(easy, CURLOPT_POSTREDIR, (long) CURL_REDIR_POST_ALL);
  }
}


static void
setup_easy(CURL *easy, jv_curl_req_t *req, const jv_curl_opts_t *o)
{
  curl_easy_setopt(easy, CURLOPT_URL, o->url);
  curl_easy_setopt(easy, CURLOPT_PRIVATE, (char *) req);
  curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, req->errbuf);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");

  /* Requests go straight to the URL's host: http_proxy and the other
   * proxy variables in the environment are ignored. */
  curl_easy_setopt(easy, CURLOPT_PROXY, "");

  curl_easy_setopt(easy, CURLOPT_USERAGENT, JV_CURL_USER_AGENT);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, write_cb);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, req);
  curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, header_cb);
  curl_easy_setopt(easy, CURLOPT_HEADERDATA, req);
  curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, seconds_to_ms(o->timeout));
  curl_easy_setopt(easy, CURLOPT_CONNECTTIMEOUT_MS,
                   seconds_to_ms(o->connect_timeout));

  curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, o->follow ? 1L : 0L);

  /* libcurl resends a request, POST included, when a reused connection
   * closes before any response; a caller that must not repeat a request
   * (a provider's create) turns reuse off. */
  if (!o->reuse) {
    curl_easy_setopt(easy, CURLOPT_FRESH_CONNECT, 1L);
    curl_easy_setopt(easy, CURLOPT_FORBID_REUSE, 1L);
  }
  curl_easy_setopt(easy, CURLOPT_MAXREDIRS, (long) o->max_redirects);
  curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, o->verify ? 1L : 0L);
  curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, o->verify ? 2L : 0L);
  if (o->ca_file != NULL) {
    curl_easy_setopt(easy, CURLOPT_CAINFO, o->ca_file);
  }

  curl_easy_setopt(easy, CURLOPT_HTTPHEADER, req->headers);
  setup_method(easy, req, o);
}


/* core.curl.request(options): see docs/api/curl.md. */
static int
l_request(lua_State *L)
{
  jv_curl_opts_t o;
  jv_curl_req_t *req;
  char message[160];
  const char *failure, *code = NULL;
  int sends_body;
  CURLMcode mrc;

  read_options(L, &o);

  /* check_url parses with libcurl, so the library loads first. */
  failure = jv__curl_load();
  if (failure != NULL) {
    return push_failure(L, failure, "library_unavailable");
  }

  failure = check_url(o.url, message, sizeof(message), &code);
  if (failure != NULL) {
    return push_failure(L, failure, code);
  }

  /* Raise now, while nothing is allocated, when L cannot wait: in that
   * case jv__co_park raises the core's usual message. */
  if (!jv__co_parkable(L)) {
    jv__co_park(L);
  }

  if (multi_init() != 0) {
    return push_failure(L, "libcurl initialisation failed", "curl_error");
  }

  req = calloc(1, sizeof(*req));
  if (req == NULL) {
    return push_failure(L, "out of memory", "no_memory");
  }

  req->max_body = (size_t) o.max_body;
  req->ref = LUA_NOREF;
  req->easy = curl_easy_init();

  if (o.body != NULL) {
    req->body = malloc(o.body_len ? o.body_len : 1);
    if (req->body != NULL) {
      memcpy(req->body, o.body, o.body_len);
      req->body_len = o.body_len;
    }
  }

  if (req->easy == NULL || (o.body != NULL && req->body == NULL)) {
    req_free(req);
    return push_failure(L, "out of memory", "no_memory");
  }

  lua_getfield(L, 1, "headers");
  sends_body = o.body != NULL || strcmp(o.method, "POST") == 0;
  if (build_headers(L, lua_gettop(L), o.header_flags, sends_body,
                    &req->headers) != 0) {
    req_free(req);
    return push_failure(L, "out of memory", "no_memory");
  }
  lua_pop(L, 1);

  setup_easy(req->easy, req, &o);

  mrc = curl_multi_add_handle(curl_state.multi, req->easy);
  if (mrc != CURLM_OK) {
    req_free(req);
    return push_failure(L, curl_multi_strerror(mrc), "curl_error");
  }

  if (curl_state.in_flight++ == 0) {
    uv_check_start(&curl_state.keepalive, keepalive_cb);
  }

  req->ref = jv__co_park(L);
  return lua_yield(L, 0);
}


int
jv__open_curl(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "request", l_request }, { NULL, NULL } };

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
