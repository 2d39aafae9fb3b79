/*
 * tcp.c: Lua sockets, TCP listeners and dialers (core.tcp).
 *
 * A socket buffers what it reads and parks at most one reader and one
 * writer coroutine. The read callback satisfies the parked read itself
 * (any bytes, exactly n bytes, or up to a delimiter) and resumes the reader
 * only once its result is ready, so a bulk read costs one resume.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define JV_SOCK_MT     "justavps.sock"
#define JV_LISTENER_MT "justavps.listener"

/* Stop reading from the kernel once this much input is buffered unread:
 * TCP flow control then slows the sender down. */
#define SOCK_READ_HIGH_WATER (256 * 1024)

/* A writer waits for the kernel once this much output is queued. */
#define SOCK_WRITE_HIGH_WATER (64 * 1024)

#define SOCK_DEFAULT_READ_MAX 65536

typedef enum {
  READ_NONE = 0,
  READ_ANY,   /* up to want bytes, as soon as there are some */
  READ_N,     /* exactly want bytes */
  READ_UNTIL, /* up to and excluding delim, at most want bytes */
} jv_read_mode_t;

typedef struct {
  jv_sock_t *sock;
} jv_sock_box_t;

struct jv_sock_s {
  jv_stream_t *stream;
  jv_sock_box_t *box; /* NULL once the userdata is collected */

  char *buf; /* unread input: buf[off .. off + len) */
  size_t off;
  size_t len;
  size_t cap;

  jv_read_mode_t mode; /* what the parked reader waits for */
  size_t want;
  char delim[16];
  size_t delim_len;

  int read_ref;         /* parked reader, or LUA_NOREF */
  int write_ref;        /* parked writer */
  int connect_ref;      /* parked dialer */
  uv_timer_t *timer[2]; /* timeouts: reader or dialer, writer */

  double timeout;             /* seconds per operation; 0 = none */
  void (*lent_close)(void *); /* borrower hook, see jv__sock_lend */
  void *lent_arg;
  int read_error;      /* sticky: UV_EOF or an error code */
  unsigned closed : 1; /* close() called */
  unsigned reading : 1;
};

static void sock_read_cb(jv_stream_t *s, ssize_t nread, const char *data);


/* Returns the userdata at idx when its metatable is the one registered
 * as tname, and raises as luaL_checkudata does otherwise. *mt keeps the
 * metatable's address after the first call, so that later calls compare
 * one pointer instead of looking tname up in the registry. The process
 * runs one Lua state, whose registered metatables live until it closes. */
static inline void *
check_udata(lua_State *L, int idx, const char *tname, const void **mt)
{
  void *p = lua_touserdata(L, idx);

  if (p != NULL && *mt != NULL && lua_getmetatable(L, idx)) {
    const void *got = lua_topointer(L, -1);

    lua_pop(L, 1);
    if (got == *mt) {
      return p;
    }
  }

  p = luaL_checkudata(L, idx, tname);
  if (*mt == NULL) {
    luaL_getmetatable(L, tname);
    *mt = lua_topointer(L, -1);
    lua_pop(L, 1);
  }

  return p;
}


/* The socket metatable's address, for check_udata. */
static const void *sock_mt;


jv_stream_t *
jv__sock_stream(jv_sock_t *sock)
{
  return sock->stream;
}


static void
timer_close_cb(uv_handle_t *handle)
{
  free(handle);
}


/* Each socket has two timers: slot 0 for the parked reader or dialer,
 * slot 1 for the parked writer, since one coroutine may read while
 * another writes. */
enum { TIMER_READ = 0, TIMER_WRITE = 1 };

static void sock_timeout_cb(uv_timer_t *timer);


static void
sock_timer_stop(jv_sock_t *sock, int slot)
{
  if (sock->timer[slot] != NULL) {
    uv_timer_stop(sock->timer[slot]);
  }
}


static void
sock_timer_start(jv_sock_t *sock, int slot)
{
  uv_timer_t *t;

  if (sock->timeout <= 0) {
    return;
  }

  t = sock->timer[slot];
  if (t == NULL) {
    t = malloc(sizeof(*t));
    if (t == NULL) {
      return;
    }
    uv_timer_init(jv__loop(), t);
    t->data = sock;
    sock->timer[slot] = t;
  }

  uv_timer_start(t, sock_timeout_cb, (uint64_t) (sock->timeout * 1000), 0);
}


/* Resumes the coroutine parked in *ref with nil, message, code. */
static void
resume_error(int *ref, int code)
{
  int r = *ref;
  lua_State *co;

  if (r == LUA_NOREF) {
    return;
  }

  *ref = LUA_NOREF;
  co = jv__co_thread(r);
  jv__push_error(co, code);
  jv__co_resume(r, 3);
}


static void
sock_timeout_cb(uv_timer_t *timer)
{
  jv_sock_t *sock = timer->data;

  if (timer == sock->timer[TIMER_WRITE]) {
    resume_error(&sock->write_ref, JV_ETIMEOUT);
    return;
  }

  if (sock->connect_ref != LUA_NOREF) {
    resume_error(&sock->connect_ref, JV_ETIMEOUT);
    return;
  }

  sock->mode = READ_NONE;
  resume_error(&sock->read_ref, JV_ETIMEOUT);
}


static void
sock_free(jv_sock_t *sock)
{
  int i;

  for (i = 0; i < 2; i++) {
    if (sock->timer[i] != NULL) {
      uv_close((uv_handle_t *) sock->timer[i], timer_close_cb);
    }
  }

  free(sock->buf);
  free(sock);
}


static void
sock_stream_closed(jv_stream_t *s)
{
  jv_sock_t *sock = s->data;

  sock->stream = NULL;

  if (sock->box == NULL) {
    sock_free(sock);
  }
}


/* Wakes every parked coroutine with an error (or, from a finalizer, drops
 * them: a __gc may run inside lua_close, where nothing may be resumed) and
 * closes the stream. */
static void
sock_close_ex(jv_sock_t *sock, int resume)
{
  void (*hook)(void *) = sock->lent_close;

  if (sock->closed) {
    return;
  }

  if (hook != NULL && resume) {
    /* The stream is lent: its borrower gives it back first, which may
     * close this socket itself. */
    sock->lent_close = NULL;
    hook(sock->lent_arg);

    if (sock->closed) {
      return;
    }
  }

  sock->closed = 1;
  sock_timer_stop(sock, TIMER_READ);
  sock_timer_stop(sock, TIMER_WRITE);
  sock->mode = READ_NONE;

  if (sock->stream != NULL) {
    jv_stream_close(sock->stream, sock_stream_closed);
  }

  if (!resume) {
    jv__co_forget(sock->read_ref);
    jv__co_forget(sock->write_ref);
    jv__co_forget(sock->connect_ref);
    sock->read_ref = sock->write_ref = sock->connect_ref = LUA_NOREF;
    return;
  }

  resume_error(&sock->read_ref, JV_ECLOSED);
  resume_error(&sock->write_ref, JV_ECLOSED);
  resume_error(&sock->connect_ref, JV_ECLOSED);
}


static void
sock_close(jv_sock_t *sock)
{
  sock_close_ex(sock, 1);
}


static void
sock_drain_cb(jv_stream_t *s)
{
  jv_sock_t *sock = s->data;
  int ref = sock->write_ref;
  lua_State *co;

  if (ref == LUA_NOREF) {
    return;
  }

  sock->write_ref = LUA_NOREF;
  sock_timer_stop(sock, TIMER_WRITE);
  co = jv__co_thread(ref);

  if (s->write_error != 0) {
    jv__push_error(co, s->write_error);
    jv__co_resume(ref, 3);
    return;
  }

  lua_pushboolean(co, 1);
  jv__co_resume(ref, 1);
}


jv_sock_t *
jv__sock_push(lua_State *L, jv_stream_t *s)
{
  jv_sock_box_t *box;
  jv_sock_t *sock;

  sock = calloc(1, sizeof(*sock));
  if (sock == NULL) {
    luaL_error(L, "out of memory");
    return NULL;
  }

  sock->stream = s;
  sock->read_ref = LUA_NOREF;
  sock->write_ref = LUA_NOREF;
  sock->connect_ref = LUA_NOREF;
  s->data = sock;
  s->drain_cb = sock_drain_cb;

  box = lua_newuserdata(L, sizeof(*box));
  box->sock = sock;
  sock->box = box;
  luaL_getmetatable(L, JV_SOCK_MT);
  lua_setmetatable(L, -2);
  return sock;
}


jv_sock_t *
jv__sock_check(lua_State *L, int idx, int allow_closed)
{
  jv_sock_box_t *box = check_udata(L, idx, JV_SOCK_MT, &sock_mt);

  if (box->sock == NULL || (!allow_closed && box->sock->closed)) {
    luaL_error(L, "attempt to use a closed socket");
    return NULL;
  }

  return box->sock;
}


static int
buf_reserve(jv_sock_t *sock, size_t extra)
{
  size_t need;
  char *nb;

  if (sock->off > 0 && sock->off + sock->len + extra > sock->cap) {
    memmove(sock->buf, sock->buf + sock->off, sock->len);
    sock->off = 0;
  }

  need = sock->len + extra;
  if (need <= sock->cap) {
    return 0;
  }

  if (need < 4096) {
    need = 4096;
  }

  if (need < sock->cap * 2) {
    need = sock->cap * 2;
  }

  nb = realloc(sock->buf, need);
  if (nb == NULL) {
    return JV_ENOMEM;
  }

  sock->buf = nb;
  sock->cap = need;
  return 0;
}


int
jv__sock_unread(jv_sock_t *sock, const char *data, size_t len)
{
  if (len == 0) {
    return 0;
  }

  if (sock->off >= len) {
    sock->off -= len;
    memcpy(sock->buf + sock->off, data, len);
    sock->len += len;
    return 0;
  }

  if (buf_reserve(sock, len) != 0) {
    return JV_ENOMEM;
  }

  memmove(sock->buf + sock->off + len, sock->buf + sock->off, sock->len);
  memcpy(sock->buf + sock->off, data, len);
  sock->len += len;
  return 0;
}


static void
buf_consume(jv_sock_t *sock, size_t n)
{
  sock->off += n;
  sock->len -= n;

  if (sock->len == 0) {
    sock->off = 0;
  }
}


const char *
jv__sock_buffered(jv_sock_t *sock, size_t *len)
{
  *len = sock->len;
  return sock->buf + sock->off;
}


void
jv__sock_consume(jv_sock_t *sock, size_t n)
{
  buf_consume(sock, n < sock->len ? n : sock->len);
}


int
jv__sock_lend(jv_sock_t *sock)
{
  if (sock->read_ref != LUA_NOREF || sock->write_ref != LUA_NOREF ||
      sock->connect_ref != LUA_NOREF) {
    return JV_EBUSY;
  }

  if (sock->reading && sock->stream != NULL) {
    jv_stream_read_stop(sock->stream);
  }

  sock->reading = 0;
  return 0;
}


static void sock_drain_cb(jv_stream_t *s);


void
jv__sock_on_lent_close(jv_sock_t *sock, void (*fn)(void *arg), void *arg)
{
  sock->lent_close = fn;
  sock->lent_arg = arg;
}


void
jv__sock_return(jv_sock_t *sock)
{
  sock->lent_close = NULL;
  sock->lent_arg = NULL;

  if (sock->stream != NULL) {
    jv_stream_read_stop(sock->stream);
    sock->stream->drain_cb = sock_drain_cb;
    sock->stream->data = sock;
  }

  sock->reading = 0;
}


static const char *
find_delim(const char *hay, size_t hay_len, const char *needle, size_t n)
{
  size_t i;

  if (n == 0 || hay_len < n) {
    return NULL;
  }

  for (i = 0; i + n <= hay_len; i++) {
    if (hay[i] == needle[0] && memcmp(hay + i, needle, n) == 0) {
      return hay + i;
    }
  }

  return NULL;
}


/*
 * Tries to complete the pending read from the buffer. On success pushes the
 * results onto L and returns their count; returns 0 when more input is
 * needed.
 */
static int
sock_try_read(jv_sock_t *sock, lua_State *L)
{
  const char *data = sock->buf + sock->off;
  const char *hit;
  size_t n;

  switch (sock->mode) {
  case READ_ANY:
    if (sock->len > 0) {
      n = sock->len < sock->want ? sock->len : sock->want;
      lua_pushlstring(L, data, n);
      buf_consume(sock, n);
      return 1;
    }
    break;

  case READ_N:
    if (sock->len >= sock->want) {
      lua_pushlstring(L, data, sock->want);
      buf_consume(sock, sock->want);
      return 1;
    }
    break;

  case READ_UNTIL:
    hit = find_delim(data, sock->len, sock->delim, sock->delim_len);
    if (hit != NULL && (size_t) (hit - data) <= sock->want) {
      n = (size_t) (hit - data);
      lua_pushlstring(L, data, n);
      buf_consume(sock, n + sock->delim_len);
      return 1;
    }

    if (sock->len > sock->want + sock->delim_len) {
      jv__push_error_msg(L, JV_ETOOLARGE,
                         "delimiter not found within the "
                         "maximum length");
      return 3;
    }
    break;

  default:
    break;
  }

  if (sock->read_error != 0) {
    if (sock->mode == READ_N && sock->len > 0 && sock->read_error == UV_EOF) {
      /* nil, message, code, partial */
      jv__push_error(L, sock->read_error);
      lua_pushlstring(L, data, sock->len);
      buf_consume(sock, sock->len);
      return 4;
    }

    return jv__push_error(L, sock->read_error);
  }

  return 0;
}


static void
sock_read_cb(jv_stream_t *s, ssize_t nread, const char *data)
{
  jv_sock_t *sock = s->data;
  lua_State *co;
  int nret, ref;

  if (nread < 0) {
    sock->read_error = (int) nread;
    jv_stream_read_stop(s);
    sock->reading = 0;

  } else {
    if (buf_reserve(sock, (size_t) nread) != 0) {
      sock->read_error = JV_ENOMEM;

    } else {
      memcpy(sock->buf + sock->off + sock->len, data, (size_t) nread);
      sock->len += (size_t) nread;
    }

    if (sock->len >= SOCK_READ_HIGH_WATER) {
      jv_stream_read_stop(s);
      sock->reading = 0;
    }
  }

  ref = sock->read_ref;
  if (ref == LUA_NOREF) {
    if (sock->reading && sock->len > 0) {
      /* No coroutine is reading, so keep the data but stop pulling more. */
      jv_stream_read_stop(s);
      sock->reading = 0;
    }
    return;
  }

  co = jv__co_thread(ref);
  nret = sock_try_read(sock, co);
  if (nret == 0) {
    if (!sock->reading && sock->read_error == 0 && !sock->closed) {
      /* Above the high-water mark yet the reader wants more (a long
       * delimiter search): keep reading. */
      if (jv_stream_read_start(s, sock_read_cb) == 0) {
        sock->reading = 1;
      }
    }
    return;
  }

  sock->read_ref = LUA_NOREF;
  sock->mode = READ_NONE;
  sock_timer_stop(sock, TIMER_READ);
  jv__co_resume(ref, nret);
}


static int
sock_read_common(lua_State *L, jv_sock_t *sock)
{
  int nret, rc;

  if (sock->read_ref != LUA_NOREF) {
    return luaL_error(L, "socket already has a coroutine reading");
  }

  nret = sock_try_read(sock, L);
  if (nret > 0) {
    sock->mode = READ_NONE;
    return nret;
  }

  if (!sock->reading) {
    rc = jv_stream_read_start(sock->stream, sock_read_cb);
    if (rc != 0) {
      sock->mode = READ_NONE;
      return jv__push_error(L, rc);
    }
    sock->reading = 1;
  }

  sock->read_ref = jv__co_park(L);
  sock_timer_start(sock, TIMER_READ);
  return lua_yield(L, 0);
}


/* sock:read([max]): returns up to max bytes (default 65536) as soon as any
 * are available; nil, message, "closed" at end of stream. */
static int
l_sock_read(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  lua_Integer max = luaL_optinteger(L, 2, SOCK_DEFAULT_READ_MAX);

  luaL_argcheck(L, max > 0, 2, "must be > 0");
  sock->mode = READ_ANY;
  sock->want = (size_t) max;
  return sock_read_common(L, sock);
}


/* sock:readn(n): returns exactly n bytes; at end of stream returns
 * nil, message, "closed", partial. */
static int
l_sock_readn(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  lua_Integer n = luaL_checkinteger(L, 2);

  luaL_argcheck(L, n >= 0, 2, "must be >= 0");
  if (n == 0) {
    lua_pushliteral(L, "");
    return 1;
  }

  sock->mode = READ_N;
  sock->want = (size_t) n;
  return sock_read_common(L, sock);
}


/* sock:readuntil(delim [, max]): returns the bytes before delim and
 * consumes delim; nil, message, "too_large" when delim does not appear
 * within max bytes (default 65536). */
static int
l_sock_readuntil(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  size_t dlen;
  const char *delim = luaL_checklstring(L, 2, &dlen);
  lua_Integer max = luaL_optinteger(L, 3, SOCK_DEFAULT_READ_MAX);

  luaL_argcheck(L, dlen > 0 && dlen <= sizeof(sock->delim), 2,
                "must be 1 to 16 bytes");
  luaL_argcheck(L, max > 0, 3, "must be > 0");

  memcpy(sock->delim, delim, dlen);
  sock->delim_len = dlen;
  sock->mode = READ_UNTIL;
  sock->want = (size_t) max;
  return sock_read_common(L, sock);
}


/* sock:write(data): data is a string or an array of strings. Returns true
 * once the bytes are accepted, waiting while too much is queued. */
static int
l_sock_write(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  uv_buf_t bufs[64];
  unsigned nbufs = 0;
  size_t len;
  int rc, i, n;

  if (lua_type(L, 2) == LUA_TTABLE) {
    n = (int) lua_objlen(L, 2);
    luaL_argcheck(L, n <= (int) JV_ARRAY_SIZE(bufs), 2, "at most 64 pieces");

    for (i = 1; i <= n; i++) {
      const char *p;

      lua_rawgeti(L, 2, i);
      p = lua_tolstring(L, -1, &len);
      if (p == NULL) {
        return luaL_argerror(L, 2, "array must hold strings");
      }
      /* The table anchors the strings until jv_stream_write copies them. */
      lua_pop(L, 1);
      bufs[nbufs++] = uv_buf_init((char *) p, (unsigned int) len);
    }

  } else {
    const char *p = luaL_checklstring(L, 2, &len);

    bufs[nbufs++] = uv_buf_init((char *) p, (unsigned int) len);
  }

  if (sock->write_ref != LUA_NOREF) {
    return luaL_error(L, "socket already has a coroutine writing");
  }

  rc = jv_stream_write(sock->stream, bufs, nbufs);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  if (sock->stream->write_queue < SOCK_WRITE_HIGH_WATER) {
    lua_pushboolean(L, 1);
    return 1;
  }

  sock->write_ref = jv__co_park(L);
  sock_timer_start(sock, TIMER_WRITE);
  return lua_yield(L, 0);
}


/* sock:flush(): waits until every queued byte is in the kernel. */
static int
l_sock_flush(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);

  if (sock->stream->write_error != 0) {
    return jv__push_error(L, sock->stream->write_error);
  }

  if (sock->stream->write_queue == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }

  if (sock->write_ref != LUA_NOREF) {
    return luaL_error(L, "socket already has a coroutine writing");
  }

  sock->write_ref = jv__co_park(L);
  sock_timer_start(sock, TIMER_WRITE);
  return lua_yield(L, 0);
}


static int
l_sock_shutdown(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  int rc = jv_stream_shutdown(sock->stream);

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


static int
l_sock_close(lua_State *L)
{
  jv_sock_box_t *box = check_udata(L, 1, JV_SOCK_MT, &sock_mt);

  if (box->sock != NULL) {
    sock_close(box->sock);
  }

  return 0;
}


static int
l_sock_closed(lua_State *L)
{
  jv_sock_box_t *box = check_udata(L, 1, JV_SOCK_MT, &sock_mt);

  lua_pushboolean(L, box->sock == NULL || box->sock->closed);
  return 1;
}


/* sock:reusable([ask_kernel]): true while an idle connection can carry
 * another request: it is open, no read failed or ended, nothing unread is
 * buffered, and the kernel has no end of stream, reset or bytes from the
 * peer. An idle socket keeps reading, so the event loop records most
 * closes by itself. ask_kernel false skips the system call that catches a
 * close since the last poll, for a caller that resends on failure. */
static int
l_sock_reusable(lua_State *L)
{
  jv_sock_box_t *box = check_udata(L, 1, JV_SOCK_MT, &sock_mt);
  jv_sock_t *sock = box->sock;
  int ask_kernel = lua_isnoneornil(L, 2) || lua_toboolean(L, 2);

  lua_pushboolean(L, sock != NULL && !sock->closed && sock->stream != NULL &&
                         sock->read_error == 0 && sock->len == 0 &&
                         !(ask_kernel && jv_stream_peer_spoke(sock->stream)));
  return 1;
}


/* sock:settimeout(seconds): applies to each later read, write and connect;
 * 0 or nil waits forever. */
static int
l_sock_settimeout(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  double t = luaL_optnumber(L, 2, 0);

  luaL_argcheck(L, t >= 0, 2, "must be >= 0");
  sock->timeout = t;
  return 0;
}


static int
push_address(lua_State *L, int peer)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  char ip[64];
  int port, rc;

  rc = jv_stream_address(sock->stream, peer, ip, sizeof(ip), &port);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}


static int
l_sock_peername(lua_State *L)
{
  return push_address(L, 1);
}


static int
l_sock_sockname(lua_State *L)
{
  return push_address(L, 0);
}


/* sock:buffered(): bytes read from the peer but not yet consumed. */
static int
l_sock_buffered(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 1);

  lua_pushinteger(L, (lua_Integer) sock->len);
  return 1;
}


/* sock:queued(): bytes accepted by write but not yet in the kernel. */
static int
l_sock_queued(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 1);

  lua_pushinteger(L,
                  sock->stream ? (lua_Integer) sock->stream->write_queue : 0);
  return 1;
}


static int
l_sock_gc(lua_State *L)
{
  jv_sock_box_t *box = check_udata(L, 1, JV_SOCK_MT, &sock_mt);
  jv_sock_t *sock = box->sock;

  if (sock == NULL) {
    return 0;
  }

  box->sock = NULL;
  sock->box = NULL;

  if (!sock->closed) {
    jv_log(JV_LOG_DEBUG, "socket collected while open; closing", NULL);
    sock_close_ex(sock, 0);
  }

  if (sock->stream == NULL) {
    sock_free(sock);
  }

  return 0;
}


static int
l_sock_tostring(lua_State *L)
{
  jv_sock_box_t *box = check_udata(L, 1, JV_SOCK_MT, &sock_mt);

  lua_pushfstring(L, "justavps.sock (%p%s)", (void *) box->sock,
                  box->sock == NULL || box->sock->closed ? ", closed" : "");
  return 1;
}


/* ---- dialing ---- */

typedef struct {
  uv_connect_t req;
  jv_sock_t *sock;
} jv_connect_t;


static void
connect_handshake_cb(jv_stream_t *s, int status)
{
  jv_sock_t *sock = s->data;
  int ref = sock->connect_ref;
  lua_State *co;

  s->handshake_cb = NULL;

  if (ref == LUA_NOREF) {
    return;
  }

  sock->connect_ref = LUA_NOREF;
  sock_timer_stop(sock, TIMER_READ);
  jv_stream_read_stop(s);
  sock->reading = 0;
  co = jv__co_thread(ref);

  if (status != 0) {
    jv__push_error(co, status);
    jv__co_resume(ref, 3);
    return;
  }

  lua_pushboolean(co, 1);
  jv__co_resume(ref, 1);
}


static void
connect_cb(uv_connect_t *req, int status)
{
  jv_connect_t *cr = (jv_connect_t *) req;
  jv_sock_t *sock = cr->sock;
  lua_State *co;
  int ref;

  free(cr);

  if (sock->closed || sock->connect_ref == LUA_NOREF) {
    return;
  }

  if (status == 0 && sock->stream->ssl != NULL) {
    /* Plain connect done: send the ClientHello, then wait for the
     * handshake to finish. */
    jv_stream_handshake(sock->stream);
    if (sock->closed || sock->connect_ref == LUA_NOREF) {
      return;
    }
    if (jv_stream_read_start(sock->stream, sock_read_cb) == 0) {
      sock->reading = 1;
      return;
    }
    status = JV_ETLS;
  }

  ref = sock->connect_ref;
  sock->connect_ref = LUA_NOREF;
  sock_timer_stop(sock, TIMER_READ);
  co = jv__co_thread(ref);

  if (status != 0) {
    jv__push_error(co, status);
    jv__co_resume(ref, 3);
    return;
  }

  lua_pushboolean(co, 1);
  jv__co_resume(ref, 1);
}


/* sock:connect(host, port): the second half of core.tcp.connect, run
 * through a Lua wrapper so the socket can be returned after the wait. */
static int
l_sock_connect(lua_State *L)
{
  jv_sock_t *sock = jv__sock_check(L, 1, 0);
  const char *host = luaL_checkstring(L, 2);
  int port = (int) luaL_checkinteger(L, 3);
  struct sockaddr_storage addr;
  jv_connect_t *cr;
  int rc;

  rc = jv__parse_addr(host, port, &addr);
  if (rc != 0) {
    return jv__push_error_msg(L, JV_EINVALID,
                              "invalid address: expected an "
                              "IPv4 or IPv6 literal and a port 0-65535");
  }

  cr = malloc(sizeof(*cr));
  if (cr == NULL) {
    return luaL_error(L, "out of memory");
  }

  cr->sock = sock;
  rc = uv_tcp_connect(&cr->req, &sock->stream->uv.tcp,
                      (struct sockaddr *) &addr, connect_cb);
  if (rc != 0) {
    free(cr);
    return jv__push_error(L, rc);
  }

  sock->connect_ref = jv__co_park(L);
  sock_timer_start(sock, TIMER_READ);
  return lua_yield(L, 0);
}


/*
 * core.tcp.socket([opts]): a new unconnected TCP socket; with opts.tls (a
 * client context) TLS starts as soon as it connects, sending opts.server_name
 * as SNI and checking the certificate against it when the context verifies.
 */
static int
l_tcp_socket(lua_State *L)
{
  jv_stream_t *s = jv_stream_new_tcp();
  jv_sock_t *sock;

  if (s == NULL) {
    return luaL_error(L, "out of memory");
  }

  sock = jv__sock_push(L, s);
  uv_tcp_nodelay(&s->uv.tcp, 1);

  if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "timeout");
    sock->timeout = luaL_optnumber(L, -1, 0);
    lua_pop(L, 1);

    lua_getfield(L, 1, "tls");
    if (!lua_isnil(L, -1)) {
      struct ssl_ctx_st *ctx = jv__tls_check(L, -1, 0);
      const char *sni;

      lua_getfield(L, 1, "server_name");
      sni = lua_tostring(L, -1);

      /* The handshake starts once connect() completes, from connect_cb. */
      s->handshake_cb = connect_handshake_cb;
      if (jv_stream_start_tls(s, ctx, 0, sni) != 0) {
        return luaL_error(L, "cannot start TLS on the socket");
      }

      /* Keep the context alive as long as the socket. */
      lua_pop(L, 1);
      lua_createtable(L, 1, 0);
      lua_pushvalue(L, -2);
      lua_rawseti(L, -2, 1);
      lua_setfenv(L, -3);
    }
    lua_pop(L, 1);
  }

  return 1;
}


/* ---- listening ---- */

typedef struct {
  jv_listener_t *l;
} jv_listener_box_t;


static void
listener_close_cb(uv_handle_t *handle)
{
  jv_listener_t *l = handle->data;

  if (l->on_close != NULL) {
    l->on_close(l);
  }

  free(l);
}


void
jv__listener_close(jv_listener_t *l)
{
  lua_State *L = jv__lua();

  if (l->closed) {
    return;
  }

  l->closed = 1;
  luaL_unref(L, LUA_REGISTRYINDEX, l->fn_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, l->tls_ref);
  l->fn_ref = LUA_NOREF;
  l->tls_ref = LUA_NOREF;
  uv_close((uv_handle_t *) &l->tcp, listener_close_cb);
}


static void
listener_connection_cb(uv_stream_t *server, int status)
{
  jv_listener_t *l = server->data;
  jv_stream_t *s;

  if (status != 0) {
    jv_log(JV_LOG_ERR, "accept failed", "error", jv_strerror(status), NULL);
    return;
  }

  s = jv_stream_new_tcp();
  if (s == NULL) {
    jv_log(JV_LOG_ALERT, "out of memory accepting a connection", NULL);
    return;
  }

  if (uv_accept(server, &s->uv.stream) != 0) {
    jv_stream_close(s, NULL);
    return;
  }

  uv_tcp_nodelay(&s->uv.tcp, 1);
  l->accepted++;

  if (l->tls != NULL && jv_stream_start_tls(s, l->tls, 1, NULL) != 0) {
    jv_log(JV_LOG_ERR, "cannot start TLS on an accepted connection", NULL);
    jv_stream_close(s, NULL);
    return;
  }

  l->on_stream(l, s);
}


jv_listener_t *
jv__listener_push(lua_State *L, const char *host, int port, int backlog,
                  int tls_index)
{
  struct sockaddr_storage addr;
  jv_listener_box_t *box;
  jv_listener_t *l;
  int rc;

  if (jv__parse_addr(host, port, &addr) != 0) {
    jv__push_error_msg(L, JV_EINVALID,
                       "invalid listen address: expected an "
                       "IPv4 or IPv6 literal and a port 0-65535");
    return NULL;
  }

  l = calloc(1, sizeof(*l));
  if (l == NULL) {
    luaL_error(L, "out of memory");
    return NULL;
  }

  l->fn_ref = LUA_NOREF;
  l->tls_ref = LUA_NOREF;
  uv_tcp_init(jv__loop(), &l->tcp);
  l->tcp.data = l;

  if (tls_index != 0) {
    l->tls = jv__tls_check(L, tls_index, 1);
    lua_pushvalue(L, tls_index);
    l->tls_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }

  rc = uv_tcp_bind(&l->tcp, (struct sockaddr *) &addr,
                   addr.ss_family == AF_INET6 ? UV_TCP_IPV6ONLY : 0);
  if (rc == 0) {
    rc = uv_listen((uv_stream_t *) &l->tcp, backlog, listener_connection_cb);
  }

  if (rc != 0) {
    l->closed = 1;
    luaL_unref(L, LUA_REGISTRYINDEX, l->tls_ref);
    uv_close((uv_handle_t *) &l->tcp, listener_close_cb);
    jv__push_error(L, rc);
    return NULL;
  }

  box = lua_newuserdata(L, sizeof(*box));
  box->l = l;
  luaL_getmetatable(L, JV_LISTENER_MT);
  lua_setmetatable(L, -2);
  return l;
}


static void
lua_listener_on_stream(jv_listener_t *l, jv_stream_t *s)
{
  lua_State *L = jv__lua();

  lua_rawgeti(L, LUA_REGISTRYINDEX, l->fn_ref);
  jv__sock_push(L, s);
  jv__co_start(L, 1, "tcp accept");
}


/*
 * core.tcp.listen{host=, port=, backlog=, tls=ctx, on_accept=fn}: fn(sock)
 * runs in a new coroutine for each connection. Port 0 picks a free port, and
 * listener:port() returns it.
 */
static int
l_tcp_listen(lua_State *L)
{
  const char *host;
  int port, backlog, tls_index = 0;
  jv_listener_t *l;

  luaL_checktype(L, 1, LUA_TTABLE);

  lua_getfield(L, 1, "host");
  host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  port = (int) luaL_checkinteger(L, -1);
  lua_getfield(L, 1, "backlog");
  backlog = (int) luaL_optinteger(L, -1, 511);
  lua_getfield(L, 1, "on_accept");
  luaL_checktype(L, -1, LUA_TFUNCTION);
  lua_getfield(L, 1, "tls");
  if (!lua_isnil(L, -1)) {
    tls_index = lua_gettop(L);
  }

  l = jv__listener_push(L, host, port, backlog, tls_index);
  if (l == NULL) {
    return 3;
  }

  lua_pushvalue(L, 5);
  l->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  l->on_stream = lua_listener_on_stream;
  return 1;
}


static jv_listener_t *
check_listener(lua_State *L)
{
  jv_listener_box_t *box = luaL_checkudata(L, 1, JV_LISTENER_MT);

  if (box->l == NULL) {
    luaL_error(L, "attempt to use a closed listener");
  }

  return box->l;
}


static int
l_listener_address(lua_State *L)
{
  jv_listener_t *l = check_listener(L);
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  char ip[64];
  int port;

  uv_tcp_getsockname(&l->tcp, (struct sockaddr *) &ss, &len);

  if (ss.ss_family == AF_INET6) {
    uv_ip6_name((struct sockaddr_in6 *) &ss, ip, sizeof(ip));
    port = ntohs(((struct sockaddr_in6 *) &ss)->sin6_port);

  } else {
    uv_ip4_name((struct sockaddr_in *) &ss, ip, sizeof(ip));
    port = ntohs(((struct sockaddr_in *) &ss)->sin_port);
  }

  lua_pushstring(L, ip);
  lua_pushinteger(L, port);
  return 2;
}


static int
l_listener_port(lua_State *L)
{
  l_listener_address(L);
  return 1;
}


static int
l_listener_close(lua_State *L)
{
  jv_listener_box_t *box = luaL_checkudata(L, 1, JV_LISTENER_MT);

  if (box->l != NULL) {
    jv__listener_close(box->l);
    box->l = NULL;
  }

  return 0;
}


static int
l_listener_accepted(lua_State *L)
{
  jv_listener_t *l = check_listener(L);

  lua_pushinteger(L, l->accepted);
  return 1;
}


int
jv__open_tcp(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "socket", l_tcp_socket },
                                    { "listen", l_tcp_listen },
                                    { NULL, NULL } };
  static const luaL_Reg sock_methods[] = {
    { "read", l_sock_read },           { "readn", l_sock_readn },
    { "readuntil", l_sock_readuntil }, { "write", l_sock_write },
    { "flush", l_sock_flush },         { "shutdown", l_sock_shutdown },
    { "close", l_sock_close },         { "closed", l_sock_closed },
    { "reusable", l_sock_reusable },   { "settimeout", l_sock_settimeout },
    { "peername", l_sock_peername },   { "sockname", l_sock_sockname },
    { "buffered", l_sock_buffered },   { "queued", l_sock_queued },
    { "connect", l_sock_connect },     { NULL, NULL }
  };
  static const luaL_Reg listener_methods[] = {
    { "address", l_listener_address },
    { "port", l_listener_port },
    { "close", l_listener_close },
    { "accepted", l_listener_accepted },
    { NULL, NULL }
  };

  luaL_newmetatable(L, JV_SOCK_MT);
  lua_newtable(L);
  luaL_setfuncs(L, sock_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_sock_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_sock_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);

  luaL_newmetatable(L, JV_LISTENER_MT);
  lua_newtable(L);
  luaL_setfuncs(L, listener_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);

  /* connect must return the socket after waiting, which a C function that
   * yields cannot do, so it is a small Lua function over socket:connect. */
  luaL_loadstring(L, "local socket = ...\n"
                     "return function(host, port, opts)\n"
                     "  local sock = socket(opts)\n"
                     "  local ok, err, code = sock:connect(host, port)\n"
                     "  if not ok then\n"
                     "    sock:close()\n"
                     "    return nil, err, code\n"
                     "  end\n"
                     "  return sock\n"
                     "end\n");
  lua_pushcfunction(L, l_tcp_socket);
  lua_call(L, 1, 1);
  lua_setfield(L, -2, "connect");
  return 1;
}
