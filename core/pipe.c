/*
 * pipe.c: a bidirectional byte pipe between two Lua sockets, used once a
 * WebSocket upgrade has passed its checks and for plain TCP relays.
 *
 * The pipe borrows both sockets' streams (jv__sock_lend) and installs its
 * own read and drain callbacks. Bytes that one side's read callback
 * delivers go to the other side with jv_stream_write, which writes them
 * synchronously when the kernel takes them and copies only the rest, so
 * the common case copies nothing. When the receiving side has more than
 * PIPE_HIGH_WATER bytes queued, the pipe stops reading from the sending
 * side until the queue drains: memory stays bounded and TCP flow control
 * slows the sender down.
 *
 * With ws_ping_interval the pipe carries a WebSocket and keeps it alive.
 * It follows the frame boundaries in each direction by reading the headers
 * and skipping each payload by its length. After that many seconds without
 * a byte either way, it sends an empty ping to each side whose stream is
 * between frames, masked toward b (the server) as a client must. The pongs
 * pass through to the other endpoint, where RFC 6455 allows an unsolicited
 * pong. Nothing is sent in a direction once a close frame went that way.
 */
#include "internal.h"
#include "ws_pipe.h"

#include <stdlib.h>

/* Stop reading from a side while the other side has this much queued. */
#define PIPE_HIGH_WATER (256 * 1024)

/* Reads of this size while the other side has nothing queued, because
 * fewer and larger reads and writes cost less CPU per byte. On the WebSocket
 * echo of tools/bench/chain.sh (64 KiB messages, 3 hops sharing one CPU of
 * a 2-core AMD EPYC VM), 256 KiB cut the hops' CPU per MB by about 20%
 * against 64 KiB, and 1 MiB did no better. */
#define PIPE_READ_SIZE (256 * 1024)

/* Reads of this size while the other side has bytes queued, so that the
 * queue stays below PIPE_HIGH_WATER plus one small read. */
#define PIPE_SMALL_READ (64 * 1024)

/* Both sides of every pipe read into this buffer, as each read is written
 * on (or copied into a write queue) before the read callback returns. */
static char pipe_read_buf[PIPE_READ_SIZE];

typedef struct jv_pipe_s jv_pipe_t;

/* Frame boundaries of the bytes read from one side. */
typedef struct {
  unsigned char head[14]; /* the frame header read so far */
  unsigned head_len;
  unsigned head_need; /* its full length, once the second byte is known */
  uint64_t remaining; /* payload bytes of the current frame still to come */
  int closed;         /* a close frame went this way */
} jv_ws_track_t;

typedef struct {
  jv_pipe_t *pipe;
  int index; /* 0 for a, 1 for b */
  jv_sock_t *sock;
  jv_stream_t *stream;
  int sock_ref; /* anchors the socket userdata */
  int reading;
  int eof;             /* reading from this side has finished */
  uint64_t bytes;      /* bytes read here and written to the other */
  jv_ws_track_t track; /* frames read here, with ws_ping_interval */
} jv_pipe_side_t;

struct jv_pipe_s {
  jv_pipe_side_t side[2];
  uv_timer_t timer;       /* idle timeout; frees the pipe on close */
  uint64_t idle_ms;       /* 0 when there is no idle timeout */
  uint64_t ping_ms;       /* 0 when the pipe sends no WebSocket pings */
  uint64_t last_activity; /* loop time of the last byte read */
  uint64_t last_ping;     /* loop time of the last ping sent */
  int ref;                /* parked coroutine */
  int starting;           /* l_pipe is still setting up */
  int done;
  int error;               /* 0, or the code that ended the pipe */
  const char *error_where; /* "reading from a", "writing to b", ... */
};

static const char *const read_where[] = { "reading from a", "reading from b" };
static const char *const write_where[] = { "writing to a", "writing to b" };


static void
pipe_free_cb(uv_handle_t *handle)
{
  free(handle->data);
}


/* Closes a socket through its Lua close method, the one way to wake and
 * release everything the socket owns. */
static void
close_socket(lua_State *L, int sock_ref)
{
  lua_rawgeti(L, LUA_REGISTRYINDEX, sock_ref);
  lua_getfield(L, -1, "close");
  lua_insert(L, -2);

  if (lua_pcall(L, 1, 0, 0) != 0) {
    jv_log(JV_LOG_ALERT, "closing a piped socket failed", "error",
           lua_tostring(L, -1), NULL);
    lua_pop(L, 1);
  }
}


/* Pushes the pipe's results onto co and returns their count:
 * a_to_b, b_to_a or nil, message, code, a_to_b, b_to_a. */
static int
push_results(lua_State *co, jv_pipe_t *pipe)
{
  lua_Number a_to_b = (lua_Number) pipe->side[0].bytes;
  lua_Number b_to_a = (lua_Number) pipe->side[1].bytes;

  if (pipe->error == 0) {
    lua_pushnumber(co, a_to_b);
    lua_pushnumber(co, b_to_a);
    return 2;
  }

  lua_pushnil(co);
  lua_pushfstring(co, "pipe failed %s: %s", pipe->error_where,
                  jv_strerror(pipe->error));
  lua_pushstring(co, jv_err_name(pipe->error));
  lua_pushnumber(co, a_to_b);
  lua_pushnumber(co, b_to_a);
  return 5;
}


/*
 * Ends the pipe: gives both streams back to their sockets, closes both
 * sockets when error is set, and resumes the parked coroutine unless
 * l_pipe is still running and returns the results itself. The pipe is
 * freed once its timer handle has closed.
 */
static void
pipe_finish(jv_pipe_t *pipe, int error, const char *where)
{
  lua_State *L = jv__lua();
  lua_State *co;
  int i, n;

  if (pipe->done) {
    return;
  }

  pipe->done = 1;
  pipe->error = error;
  pipe->error_where = where;

  for (i = 0; i < 2; i++) {
    pipe->side[i].stream->read_buf = NULL;
    jv__sock_return(pipe->side[i].sock);
    pipe->side[i].reading = 0;
  }

  for (i = 0; i < 2; i++) {
    if (error != 0) {
      close_socket(L, pipe->side[i].sock_ref);
    }
    luaL_unref(L, LUA_REGISTRYINDEX, pipe->side[i].sock_ref);
    pipe->side[i].sock_ref = LUA_NOREF;
  }

  uv_close((uv_handle_t *) &pipe->timer, pipe_free_cb);

  if (pipe->starting) {
    return;
  }

  co = jv__co_thread(pipe->ref);
  n = push_results(co, pipe);
  jv__co_resume(pipe->ref, n);
}


static void pipe_read_cb(jv_stream_t *s, ssize_t nread, const char *data);


static int
side_read_start(jv_pipe_side_t *side)
{
  int rc;

  if (side->reading || side->eof) {
    return 0;
  }

  rc = jv_stream_read_start(side->stream, pipe_read_cb);
  if (rc == 0) {
    side->reading = 1;
  }

  return rc;
}


static void
side_read_stop(jv_pipe_side_t *side)
{
  if (side->reading) {
    jv_stream_read_stop(side->stream);
    side->reading = 0;
  }
}


/* Records that side will deliver no more bytes: the other side's write
 * half closes once its queue is out, and the pipe ends when both sides
 * are done. */
static void
side_eof(jv_pipe_side_t *side)
{
  jv_pipe_t *pipe = side->pipe;
  jv_pipe_side_t *other = &pipe->side[1 - side->index];
  int rc;

  side_read_stop(side);
  side->eof = 1;

  rc = jv_stream_shutdown(other->stream);
  if (rc != 0) {
    pipe_finish(pipe, rc, write_where[other->index]);
    return;
  }

  if (other->eof) {
    pipe_finish(pipe, 0, NULL);
  }
}


/* Follows the frame headers in n bytes read from one side. */
static void
ws_track(jv_ws_track_t *t, const unsigned char *p, size_t n)
{
  while (n > 0) {
    if (t->remaining > 0) {
      uint64_t k = n < t->remaining ? n : t->remaining;

      t->remaining -= k;
      p += k;
      n -= (size_t) k;
      continue;
    }

    t->head[t->head_len++] = *p++;
    n--;

    if (t->head_len == 2) {
      unsigned len7 = t->head[1] & 0x7f;

      t->head_need = 2 +
                     (len7 == 126   ? 2
                      : len7 == 127 ? 8
                                    : 0) +
                     ((t->head[1] & 0x80) ? 4 : 0);
    }

    if (t->head_len >= 2 && t->head_len == t->head_need) {
      uint64_t len = t->head[1] & 0x7f;
      unsigned i;

      if (len == 126) {
        len = ((uint64_t) t->head[2] << 8) | t->head[3];
      } else if (len == 127) {
        len = 0;
        for (i = 2; i < 10; i++) {
          len = (len << 8) | t->head[i];
        }
      }
      if ((t->head[0] & 0x0f) == 0x8) {
        t->closed = 1;
      }
      t->remaining = len;
      t->head_len = 0;
      t->head_need = 0;
    }
  }
}


/* Sends an empty ping to side unless its stream is inside a frame, or a
 * close or the end of stream went to it (its write half is shut down).
 * feeder is the side whose bytes go to side. */
static void
ws_ping(jv_pipe_t *pipe, jv_pipe_side_t *side, jv_pipe_side_t *feeder)
{
  unsigned char frame[6] = { 0x89, 0x00 };
  size_t len = 2;
  uv_buf_t buf;
  int rc;

  if (feeder->eof || feeder->track.closed || feeder->track.head_len != 0 ||
      feeder->track.remaining != 0) {
    return;
  }

  /* A frame to the server must be masked, with an unpredictable key. */
  if (side->index == 1) {
    frame[1] = 0x80;
    if (uv_random(NULL, NULL, frame + 2, 4, 0, NULL) != 0) {
      return;
    }
    len = 6;
  }

  buf = uv_buf_init((char *) frame, (unsigned int) len);
  rc = jv_stream_write(side->stream, &buf, 1);
  if (rc != 0) {
    pipe_finish(pipe, rc, write_where[side->index]);
  }
}


/* Writes bytes read from side to the other side, pausing side while the
 * other's queue is above the high-water mark. Returns 0 or an error code
 * (the pipe has then finished). */
static int
side_forward(jv_pipe_side_t *side, const char *data, size_t len)
{
  jv_pipe_t *pipe = side->pipe;
  jv_pipe_side_t *other = &pipe->side[1 - side->index];
  uv_buf_t buf;
  int rc;

  if (pipe->ping_ms > 0) {
    ws_track(&side->track, (const unsigned char *) data, len);
  }

  buf = uv_buf_init((char *) data, (unsigned int) len);
  rc = jv_stream_write(other->stream, &buf, 1);
  if (rc != 0) {
    pipe_finish(pipe, rc, write_where[other->index]);
    return rc;
  }

  side->bytes += len;
  pipe->last_activity = jv__now_ms();

  side->stream->read_buf_size =
      other->stream->write_queue == 0 ? PIPE_READ_SIZE : PIPE_SMALL_READ;
  if (other->stream->write_queue > PIPE_HIGH_WATER) {
    side_read_stop(side);
  }

  return 0;
}


static void
pipe_read_cb(jv_stream_t *s, ssize_t nread, const char *data)
{
  jv_pipe_side_t *side = s->data;
  jv_pipe_t *pipe = side->pipe;

  if (nread > 0) {
    side_forward(side, data, (size_t) nread);
    return;
  }

  if (nread == UV_EOF) {
    side_eof(side);
    return;
  }

  if (nread < 0) {
    pipe_finish(pipe, (int) nread, read_where[side->index]);
  }
}


/* Runs when side's write queue is empty: resumes reading from the side
 * that feeds it. */
static void
pipe_drain_cb(jv_stream_t *s)
{
  jv_pipe_side_t *side = s->data;
  jv_pipe_t *pipe = side->pipe;
  jv_pipe_side_t *feeder = &pipe->side[1 - side->index];
  int rc;

  if (s->write_error != 0) {
    pipe_finish(pipe, s->write_error, write_where[side->index]);
    return;
  }

  feeder->stream->read_buf_size = PIPE_READ_SIZE;
  rc = side_read_start(feeder);
  if (rc != 0) {
    pipe_finish(pipe, rc, read_where[feeder->index]);
  }
}


/* Returns the milliseconds until the timer must next run: the idle
 * deadline, or the next ping once ping_ms passed without a byte and
 * since the last ping; 0 when neither applies. */
static uint64_t
pipe_timer_due(jv_pipe_t *pipe, uint64_t now)
{
  uint64_t due = 0, at;

  if (pipe->idle_ms > 0) {
    at = pipe->last_activity + pipe->idle_ms;
    due = at > now ? at - now : 1;
  }
  if (pipe->ping_ms > 0) {
    at = pipe->last_activity > pipe->last_ping ? pipe->last_activity
                                               : pipe->last_ping;
    at += pipe->ping_ms;
    at = at > now ? at - now : 1;
    if (due == 0 || at < due) {
      due = at;
    }
  }
  return due;
}


/* Ends the pipe once no byte has been read for idle_ms, and sends the
 * WebSocket pings. Reads only record their time, so the timer is
 * re-armed here, not on every read. */
static void
pipe_timer_cb(uv_timer_t *timer)
{
  jv_pipe_t *pipe = timer->data;
  uint64_t now = jv__now_ms();
  uint64_t idle = now - pipe->last_activity;
  uint64_t due;

  if (pipe->idle_ms > 0 && idle >= pipe->idle_ms) {
    pipe_finish(pipe, JV_ETIMEOUT, "waiting for bytes in either direction");
    return;
  }

  if (pipe->ping_ms > 0 && idle >= pipe->ping_ms &&
      now - pipe->last_ping >= pipe->ping_ms) {
    pipe->last_ping = now;
    ws_ping(pipe, &pipe->side[0], &pipe->side[1]);
    if (!pipe->done) {
      ws_ping(pipe, &pipe->side[1], &pipe->side[0]);
    }
    if (pipe->done) {
      return;
    }
  }

  due = pipe_timer_due(pipe, now);
  if (due > 0) {
    uv_timer_start(timer, pipe_timer_cb, due, 0);
  }
}


/* Runs when other code closes a socket the pipe holds: the pipe ends with
 * an error, giving both streams back before the socket closes. */
static void
side_lent_close(void *arg)
{
  jv_pipe_side_t *side = arg;

  pipe_finish(side->pipe, JV_ECLOSED, "socket closed while piped");
}


/* Borrows sock's stream for the pipe. Returns 0 or JV_EBUSY. */
static void side_lent_close(void *arg);


static int
side_attach(lua_State *L, jv_pipe_t *pipe, int index, int idx)
{
  jv_pipe_side_t *side = &pipe->side[index];
  jv_sock_t *sock = jv__sock_check(L, idx, 0);
  int rc;

  rc = jv__sock_lend(sock);
  if (rc != 0) {
    return rc;
  }

  side->pipe = pipe;
  side->index = index;
  side->sock = sock;
  side->stream = jv__sock_stream(sock);
  side->stream->data = side;
  side->stream->drain_cb = pipe_drain_cb;
  side->stream->read_buf = pipe_read_buf;
  side->stream->read_buf_size = sizeof(pipe_read_buf);
  jv__sock_on_lent_close(sock, side_lent_close, side);
  lua_pushvalue(L, idx);
  side->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}


/* Sends the bytes that side's socket had read but no caller consumed, such
 * as what followed an HTTP upgrade request, before anything new. */
static int
side_forward_buffered(jv_pipe_side_t *side)
{
  const char *data;
  size_t len;
  int rc;

  data = jv__sock_buffered(side->sock, &len);
  if (len == 0) {
    return 0;
  }

  rc = side_forward(side, data, len);
  if (rc == 0) {
    jv__sock_consume(side->sock, len);
  }

  return rc;
}


/*
 * pipe(a, b [, {idle_timeout = seconds}]): copies bytes both ways between
 * sockets a and b until both directions have finished, and returns
 * bytes_a_to_b, bytes_b_to_a. End of stream on one side shuts down the
 * write half of the other. A read or write error, or no byte in either
 * direction for idle_timeout seconds, closes both sockets and returns
 * nil, message, code, bytes_a_to_b, bytes_b_to_a. Raises when a socket is
 * closed, is the other socket, or has a coroutine parked on it.
 *
 * Closing either socket from other code while the pipe runs ends the pipe
 * with "closed" and closes the other socket too.
 */
static int
l_pipe(lua_State *L)
{
  jv_pipe_t *pipe;
  const char *busy;
  double idle = 0, ping = 0;
  int i, rc;

  /* A socket piped to itself would read its own output. */
  luaL_argcheck(L,
                jv__sock_stream(jv__sock_check(L, 1, 0)) !=
                    jv__sock_stream(jv__sock_check(L, 2, 0)),
                2, "must be a different socket than a");

  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "idle_timeout");
    idle = luaL_optnumber(L, -1, 0);
    lua_pop(L, 1);
    luaL_argcheck(L, idle >= 0, 3, "idle_timeout must be >= 0");
    lua_getfield(L, 3, "ws_ping_interval");
    ping = luaL_optnumber(L, -1, 0);
    lua_pop(L, 1);
    luaL_argcheck(L, ping >= 0, 3, "ws_ping_interval must be >= 0");
  }

  /* Park first: it raises outside a scheduler coroutine, and nothing has
   * been borrowed yet. */
  pipe = calloc(1, sizeof(*pipe));
  if (pipe == NULL) {
    return luaL_error(L, "out of memory");
  }

  pipe->ref = jv__co_park(L);
  pipe->starting = 1;
  pipe->side[0].sock_ref = LUA_NOREF;
  pipe->side[1].sock_ref = LUA_NOREF;

  rc = side_attach(L, pipe, 0, 1);
  if (rc != 0) {
    goto free_pipe;
  }

  rc = side_attach(L, pipe, 1, 2);
  if (rc != 0) {
    goto return_a;
  }

  uv_timer_init(jv__loop(), &pipe->timer);
  pipe->timer.data = pipe;
  pipe->last_activity = jv__now_ms();
  pipe->idle_ms = (uint64_t) (idle * 1000);
  pipe->ping_ms = (uint64_t) (ping * 1000);
  pipe->last_ping = pipe->last_activity;

  if (pipe->idle_ms > 0 || pipe->ping_ms > 0) {
    uv_timer_start(&pipe->timer, pipe_timer_cb,
                   pipe_timer_due(pipe, pipe->last_activity), 0);
  }

  for (i = 0; i < 2 && !pipe->done; i++) {
    side_forward_buffered(&pipe->side[i]);
  }

  for (i = 0; i < 2 && !pipe->done; i++) {
    jv_pipe_side_t *other = &pipe->side[1 - i];

    if (other->stream->write_queue > PIPE_HIGH_WATER) {
      continue;
    }

    rc = side_read_start(&pipe->side[i]);
    if (rc != 0) {
      pipe_finish(pipe, rc, read_where[i]);
    }
  }

  pipe->starting = 0;

  if (pipe->done) {
    /* Finished during setup: the timer's close callback frees the pipe
     * later, so its fields are still valid here. */
    jv__co_forget(pipe->ref);
    return push_results(L, pipe);
  }

  return lua_yield(L, 0);

return_a:
  pipe->side[0].stream->read_buf = NULL;
  jv__sock_return(pipe->side[0].sock);
  luaL_unref(L, LUA_REGISTRYINDEX, pipe->side[0].sock_ref);

free_pipe:
  busy = pipe->side[0].sock != NULL ? "b" : "a";
  jv__co_forget(pipe->ref);
  free(pipe);
  return luaL_error(L,
                    "pipe: a coroutine is parked reading from or "
                    "writing to socket %s",
                    busy);
}


int
jv__open_pipe(lua_State *L)
{
  lua_pushcfunction(L, l_pipe);
  return 1;
}
