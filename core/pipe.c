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
#define _GNU_SOURCE /* splice, pipe2, F_GETPIPE_SZ */

#include "internal.h"
#include "ws_pipe.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Stop reading from a side while the other side has this much queued. */
#define PIPE_HIGH_WATER (256 * 1024)

/* In splice mode, WebSocket payloads of at least this many bytes move
 * through the kernel pipe; smaller frames are copied through splice_buf. */
#define SPLICE_MIN_PAYLOAD (16 * 1024)

/* Bytes read at a frame header after a large frame: the longest header,
 * so the payload that follows it stays in the kernel for splice. */
#define SPLICE_HEAD_READ 14

/* Rounds of read and write per direction in one poll callback, so that a
 * busy connection does not starve the rest of the loop. */
#define SPLICE_ROUNDS 8

/* Copies in splice mode go through this buffer; the loop is single-threaded
 * and every read is written on before the next. */
static char splice_buf[65536];

typedef struct jv_pipe_s jv_pipe_t;

/* Frame boundaries of the bytes read from one side. */
typedef struct {
  unsigned char head[14]; /* the frame header read so far */
  unsigned head_len;
  unsigned head_need; /* its full length, once the second byte is known */
  uint64_t remaining; /* payload bytes of the current frame still to come */
  uint64_t last_len;  /* payload length of the last header completed */
  int closed;         /* a close frame went this way */
} jv_ws_track_t;

/* Splice mode: the bytes read from one side on their way to the other. */
typedef struct {
  int pipe_r, pipe_w; /* the kernel pipe, -1 when closed */
  size_t in_pipe;     /* bytes in the kernel pipe not yet written */
  size_t capacity;    /* the kernel pipe's size in bytes */
} jv_splice_dir_t;

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
  int fd;              /* splice mode: a dup of the socket's fd, else -1 */
  uv_poll_t poll;      /* splice mode: watches fd */
  int poll_events;     /* the events poll watches now */
  jv_splice_dir_t out; /* splice mode: bytes read here for the other */
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
  int spliced;             /* in splice mode (see splice_enter) */
  int open_handles;        /* handles whose close callback frees the pipe */
  uint64_t spliced_bytes;  /* bytes moved with splice(2), never copied */
  int error;               /* 0, or the code that ended the pipe */
  const char *error_where; /* "reading from a", "writing to b", ... */
};

static const char *const read_where[] = { "reading from a", "reading from b" };
static const char *const write_where[] = { "writing to a", "writing to b" };


static void
pipe_release(jv_pipe_t *pipe)
{
  if (--pipe->open_handles == 0) {
    free(pipe);
  }
}


static void
pipe_timer_closed(uv_handle_t *handle)
{
  pipe_release(handle->data);
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


/* Pushes the pipe's results onto co and returns their count: a_to_b,
 * b_to_a, spliced or nil, message, code, a_to_b, b_to_a, spliced. */
static int
push_results(lua_State *co, jv_pipe_t *pipe)
{
  lua_Number a_to_b = (lua_Number) pipe->side[0].bytes;
  lua_Number b_to_a = (lua_Number) pipe->side[1].bytes;
  lua_Number spliced = (lua_Number) pipe->spliced_bytes;

  if (pipe->error == 0) {
    lua_pushnumber(co, a_to_b);
    lua_pushnumber(co, b_to_a);
    lua_pushnumber(co, spliced);
    return 3;
  }

  lua_pushnil(co);
  lua_pushfstring(co, "pipe failed %s: %s", pipe->error_where,
                  jv_strerror(pipe->error));
  lua_pushstring(co, jv_err_name(pipe->error));
  lua_pushnumber(co, a_to_b);
  lua_pushnumber(co, b_to_a);
  lua_pushnumber(co, spliced);
  return 6;
}


static void splice_close(jv_pipe_t *pipe);


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
  splice_close(pipe);

  for (i = 0; i < 2; i++) {
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

  uv_close((uv_handle_t *) &pipe->timer, pipe_timer_closed);

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
      t->last_len = len;
      t->head_len = 0;
      t->head_need = 0;
    }
  }
}


static void splice_ping(jv_pipe_t *pipe, jv_pipe_side_t *feeder,
                        const unsigned char *frame, size_t len);


/* Sends an empty ping to side unless its stream is inside a frame, or a
 * close or the end of stream went to it. feeder is the side whose bytes go
 * to side. */
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

  if (pipe->spliced) {
    splice_ping(pipe, feeder, frame, len);
    return;
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

  rc = side_read_start(feeder);
  if (rc != 0) {
    pipe_finish(pipe, rc, read_where[feeder->index]);
  }
}


/*
 * Splice mode. When both sockets are plain TCP, the pipe moves bytes
 * socket -> kernel pipe -> socket with splice(2), so the payload is never
 * copied to user space: the kernel passes page references along.
 *
 * libuv has no splice, and a uv_tcp_t and a uv_poll_t must not watch the
 * same fd. So the pipe watches a dup of each socket's fd with a uv_poll_t
 * while the uv_tcp_t stays idle: the socket is lent, so nobody reads from
 * it, and the pipe starts splice mode only once both write queues are
 * empty. The half-close still goes through jv_stream_shutdown, after the
 * kernel pipe toward that side is empty, so the stream knows its write
 * half is shut when the socket is returned.
 *
 * Each direction reads only when its kernel pipe is empty, so the kernel
 * pipe (64 KiB unless the system sets another default) bounds the bytes
 * in flight, and a full socket buffer on the far side stops reading from
 * the near side as PIPE_HIGH_WATER does in copy mode.
 *
 * With ws_ping_interval the frame headers must be seen. After a frame of
 * at least SPLICE_MIN_PAYLOAD bytes, the next header is read with a small
 * recv, written into the kernel pipe ahead of the payload, and the payload
 * is spliced after it, so header and payload leave in one send. Smaller
 * frames are read in 64 KiB blocks and copied with send, as in copy mode.
 * Pings go into the kernel pipe between frames.
 *
 * A splice that fails with EINVAL or ENOSYS (a kernel or socket type
 * without splice support) ends splice mode: the bytes in the kernel pipes
 * are read back and written with jv_stream_write, and the pipe goes on in
 * copy mode.
 */

static void splice_leave(jv_pipe_t *pipe);


/* Returns non-zero inside the payload of a frame of at least
 * SPLICE_MIN_PAYLOAD bytes, which splice mode moves with splice. */
static int
in_large_payload(const jv_ws_track_t *t)
{
  return t->remaining > 0 && t->last_len >= SPLICE_MIN_PAYLOAD;
}


static int
splice_unsupported(int err)
{
  return err == EINVAL || err == ENOSYS || err == EOPNOTSUPP;
}


static void
splice_note_read(jv_pipe_t *pipe, jv_pipe_side_t *src, size_t n)
{
  src->bytes += n;
  pipe->last_activity = jv__now_ms();
}


/* The read side of src has ended: once the kernel pipe toward dst is
 * empty, shuts down dst's write half, and ends the pipe when the other
 * direction is done too. */
static void
splice_direction_done(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  jv_pipe_side_t *dst = &pipe->side[1 - src->index];
  int rc;

  rc = jv_stream_shutdown(dst->stream);
  if (rc != 0) {
    pipe_finish(pipe, rc, write_where[dst->index]);
    return;
  }

  if (dst->eof && dst->out.in_pipe == 0) {
    pipe_finish(pipe, 0, NULL);
  }
}


/* Moves up to len bytes from src's socket into its kernel pipe; the
 * caller follows the frames in them. Returns the count, 0 when the socket
 * has nothing now (or the kernel pipe is full), or -1 when the pipe
 * finished or left splice mode. */
static ssize_t
splice_in(jv_pipe_t *pipe, jv_pipe_side_t *src, size_t len)
{
  jv_splice_dir_t *d = &src->out;
  ssize_t n;

  do {
    n = splice(src->fd, NULL, d->pipe_w, NULL, len,
               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
  } while (n < 0 && errno == EINTR);

  if (n > 0) {
    d->in_pipe += (size_t) n;
    pipe->spliced_bytes += (uint64_t) n;
    splice_note_read(pipe, src, (size_t) n);
    return n;
  }

  if (n == 0) {
    src->eof = 1;
    return 0;
  }

  if (errno == EAGAIN) {
    return 0;
  }

  if (splice_unsupported(errno) && d->in_pipe == 0) {
    splice_leave(pipe);
    return -1;
  }

  pipe_finish(pipe, -errno, read_where[src->index]);
  return -1;
}


/* Puts n bytes into src's kernel pipe, which has room for them: it holds
 * nothing but a frame header, and n is at most its capacity. */
static int
splice_stage(jv_pipe_t *pipe, jv_pipe_side_t *src, const char *data,
             size_t n)
{
  jv_splice_dir_t *d = &src->out;
  ssize_t w;

  do {
    w = write(d->pipe_w, data, n);
  } while (w < 0 && errno == EINTR);

  if (w != (ssize_t) n) {
    /* A write to a pipe with room for it is never short. */
    pipe_finish(pipe, w < 0 ? -errno : JV_EINVALID, write_where[1 - src->index]);
    return -1;
  }

  d->in_pipe += n;
  return 0;
}


/* Reads a block from src into splice_buf with recv, follows its frame
 * headers and passes it on: into the kernel pipe ahead of a large payload,
 * else straight to dst with send, staging what dst did not take. Returns
 * 1 when bytes moved, 0 when src has nothing now, -1 when the pipe
 * finished. */
static int
splice_copy(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  jv_pipe_side_t *dst = &pipe->side[1 - src->index];
  jv_ws_track_t *t = &src->track;
  size_t size = src->out.capacity < sizeof(splice_buf) ? src->out.capacity
                                                       : sizeof(splice_buf);
  ssize_t n, sent;

  /* After a large frame, read no further than the next header. */
  if (t->remaining == 0 && t->last_len >= SPLICE_MIN_PAYLOAD) {
    size = SPLICE_HEAD_READ - t->head_len;
  }

  do {
    n = recv(src->fd, splice_buf, size, 0);
  } while (n < 0 && errno == EINTR);

  if (n == 0) {
    src->eof = 1;
    return 0;
  }

  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return 0;
    }
    pipe_finish(pipe, -errno, read_where[src->index]);
    return -1;
  }

  ws_track(t, (const unsigned char *) splice_buf, (size_t) n);
  splice_note_read(pipe, src, (size_t) n);

  if (in_large_payload(t)) {
    return splice_stage(pipe, src, splice_buf, (size_t) n) == 0 ? 1 : -1;
  }

  do {
    sent = send(dst->fd, splice_buf, (size_t) n, MSG_DONTWAIT | MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);

  if (sent < 0) {
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      pipe_finish(pipe, -errno, write_where[dst->index]);
      return -1;
    }
    sent = 0;
  }

  if (sent < n &&
      splice_stage(pipe, src, splice_buf + sent, (size_t) (n - sent)) != 0) {
    return -1;
  }

  return 1;
}


/* Looks at the next frame header with MSG_PEEK and, when it starts a
 * payload of at least SPLICE_MIN_PAYLOAD bytes, splices header and payload
 * in one call. Returns 1 when bytes moved, 0 when src has nothing now,
 * -1 when the pipe finished, and 2 when the frame is small or its header
 * incomplete, for splice_copy to read. */
static int
splice_peek_frame(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  jv_ws_track_t *t = &src->track;
  unsigned char head[SPLICE_HEAD_READ];
  unsigned need, len7, i;
  uint64_t payload;
  size_t len;
  ssize_t n;

  do {
    n = recv(src->fd, head, sizeof(head), MSG_PEEK);
  } while (n < 0 && errno == EINTR);

  if (n == 0) {
    src->eof = 1;
    return 0;
  }
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return 0;
    }
    pipe_finish(pipe, -errno, read_where[src->index]);
    return -1;
  }
  if (n < 2) {
    return 2;
  }

  len7 = head[1] & 0x7f;
  need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((head[1] & 0x80) ? 4 : 0);
  if ((unsigned) n < need) {
    return 2;
  }

  payload = len7;
  if (len7 == 126) {
    payload = ((uint64_t) head[2] << 8) | head[3];
  } else if (len7 == 127) {
    payload = 0;
    for (i = 2; i < 10; i++) {
      payload = (payload << 8) | head[i];
    }
  }
  if (payload < SPLICE_MIN_PAYLOAD) {
    return 2;
  }

  len = src->out.capacity;
  if (need + payload < len) {
    len = (size_t) (need + payload);
  }

  n = splice_in(pipe, src, len);
  if (n <= 0) {
    return (int) n;
  }

  /* The header bytes are known from the peek; the rest is payload. */
  ws_track(t, head, (size_t) n < need ? (size_t) n : need);
  if ((size_t) n > need) {
    t->remaining -= (uint64_t) ((size_t) n - need);
  }
  return 1;
}


/* Reads from src into its empty kernel pipe: a splice of everything the
 * pipe holds for a raw relay or inside a large WebSocket payload, else a
 * copied block, followed by a splice when that block began a large
 * payload. Returns 1 when bytes moved, 0 when src has nothing now or
 * ended, -1 when the pipe finished or left splice mode. */
static int
splice_fill(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  jv_splice_dir_t *d = &src->out;
  jv_ws_track_t *t = &src->track;
  size_t len = d->capacity;
  ssize_t n;
  int rc = 0;

  if (pipe->ping_ms > 0 && !in_large_payload(t)) {
    if (t->remaining == 0 && t->head_len == 0 &&
        t->last_len >= SPLICE_MIN_PAYLOAD) {
      rc = splice_peek_frame(pipe, src);
      if (rc != 2) {
        return rc;
      }
    }
    rc = splice_copy(pipe, src);
    if (rc <= 0 || !in_large_payload(t)) {
      return rc;
    }
    /* The header is in the kernel pipe; the payload follows it. */
    len = d->capacity - d->in_pipe;
  }

  if (pipe->ping_ms > 0 && t->remaining < len) {
    len = (size_t) t->remaining;
  }

  /* A splice of 0 bytes returns 0, which would read as end of stream. */
  if (len == 0) {
    return rc;
  }

  n = splice_in(pipe, src, len);
  if (n < 0) {
    return -1;
  }
  if (pipe->ping_ms > 0) {
    t->remaining -= (uint64_t) n;
  }

  return n > 0 ? 1 : rc;
}


/* Writes what src's kernel pipe holds to the other side. Returns 1 when
 * the pipe is empty, 0 when the other side's socket buffer is full, -1
 * when the pipe finished or left splice mode. */
static int
splice_flush(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  jv_pipe_side_t *dst = &pipe->side[1 - src->index];
  jv_splice_dir_t *d = &src->out;
  ssize_t n;

  while (d->in_pipe > 0) {
    do {
      n = splice(d->pipe_r, NULL, dst->fd, NULL, d->in_pipe,
                 SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    } while (n < 0 && errno == EINTR);

    if (n < 0) {
      if (errno == EAGAIN) {
        return 0;
      }
      if (splice_unsupported(errno)) {
        splice_leave(pipe);
        return -1;
      }
      pipe_finish(pipe, -errno, write_where[dst->index]);
      return -1;
    }

    d->in_pipe -= (size_t) n;
    if (d->in_pipe > 0) {
      /* A short splice means dst's socket buffer is full. */
      return 0;
    }
  }

  return 1;
}


/* Moves bytes read from src to the other side until one of them would
 * block, for at most SPLICE_ROUNDS rounds. */
static void
splice_pump(jv_pipe_t *pipe, jv_pipe_side_t *src)
{
  int round, rc;

  for (round = 0; round < SPLICE_ROUNDS; round++) {
    rc = 1;
    if (src->out.in_pipe == 0 && !src->eof) {
      rc = splice_fill(pipe, src);
      if (rc < 0) {
        return;
      }
    }

    if (src->out.in_pipe > 0) {
      rc = splice_flush(pipe, src);
      if (rc <= 0) {
        return;
      }
    }

    if (src->eof) {
      splice_direction_done(pipe, src);
      return;
    }

    if (rc == 0) {
      return;
    }
  }
}


/* Watches each fd for what the pipe waits for: readable while its kernel
 * pipe is empty and it has not ended, writable while the kernel pipe
 * toward it holds bytes. */
static void splice_poll_cb(uv_poll_t *handle, int status, int events);


static void
splice_poll_update(jv_pipe_t *pipe)
{
  int i, events, rc;

  for (i = 0; i < 2 && !pipe->done && pipe->spliced; i++) {
    jv_pipe_side_t *side = &pipe->side[i];
    jv_pipe_side_t *other = &pipe->side[1 - i];

    events = 0;
    if (!side->eof && side->out.in_pipe == 0) {
      events |= UV_READABLE;
    }
    if (other->out.in_pipe > 0) {
      events |= UV_WRITABLE;
    }

    if (events == side->poll_events) {
      continue;
    }

    side->poll_events = events;
    if (events == 0) {
      uv_poll_stop(&side->poll);
      continue;
    }

    rc = uv_poll_start(&side->poll, events, splice_poll_cb);
    if (rc != 0) {
      pipe_finish(pipe, rc, read_where[i]);
    }
  }
}


static void
splice_poll_cb(uv_poll_t *handle, int status, int events)
{
  jv_pipe_side_t *side = handle->data;
  jv_pipe_t *pipe = side->pipe;
  jv_pipe_side_t *other = &pipe->side[1 - side->index];

  if (status < 0) {
    pipe_finish(pipe, status, read_where[side->index]);
    return;
  }

  if (events & UV_WRITABLE) {
    splice_pump(pipe, other);
  }
  if ((events & UV_READABLE) && !pipe->done && pipe->spliced) {
    splice_pump(pipe, side);
  }

  splice_poll_update(pipe);
}


static void
splice_ping(jv_pipe_t *pipe, jv_pipe_side_t *feeder,
            const unsigned char *frame, size_t len)
{
  ssize_t n;

  /* A ping that does not fit in the kernel pipe waits for the next
   * interval: the side it goes to is not reading anyway. */
  n = write(feeder->out.pipe_w, frame, len);
  if (n != (ssize_t) len) {
    return;
  }

  feeder->out.in_pipe += len;
  splice_pump(pipe, feeder);
  splice_poll_update(pipe);
}


static void
splice_poll_closed(uv_handle_t *handle)
{
  jv_pipe_side_t *side = handle->data;

  pipe_release(side->pipe);
}


static void
close_fd(int *fd)
{
  if (*fd >= 0) {
    close(*fd);
    *fd = -1;
  }
}


/* Stops watching the sockets and closes the dup'd fds; the kernel pipes
 * stay open for splice_leave. The fds may close at once after
 * uv_close (libuv docs, uv_poll_t). */
static void
splice_stop_polls(jv_pipe_t *pipe)
{
  int i;

  for (i = 0; i < 2; i++) {
    jv_pipe_side_t *side = &pipe->side[i];

    if (side->fd < 0) {
      continue;
    }
    uv_close((uv_handle_t *) &side->poll, splice_poll_closed);
    close_fd(&side->fd);
  }
  pipe->spliced = 0;
}


/* Releases everything splice mode holds; bytes still in a kernel pipe are
 * dropped, as the pipe ends. Does nothing outside splice mode. */
static void
splice_close(jv_pipe_t *pipe)
{
  int i;

  splice_stop_polls(pipe);
  for (i = 0; i < 2; i++) {
    close_fd(&pipe->side[i].out.pipe_r);
    close_fd(&pipe->side[i].out.pipe_w);
  }
}


/* Goes on in copy mode: writes the bytes in the kernel pipes to their
 * streams, shuts down the write half toward a side whose feeder ended,
 * and starts reading as l_pipe does. */
static void
splice_leave(jv_pipe_t *pipe)
{
  const char *reason = strerror(errno);
  int i, rc;
  ssize_t n;

  splice_stop_polls(pipe);
  jv_log(JV_LOG_WARN, "splice failed, pipe continues by copying", "error",
         reason, NULL);

  for (i = 0; i < 2 && !pipe->done; i++) {
    jv_pipe_side_t *side = &pipe->side[i];
    jv_pipe_side_t *other = &pipe->side[1 - i];

    while (side->out.in_pipe > 0) {
      uv_buf_t buf;

      n = read(side->out.pipe_r, splice_buf, sizeof(splice_buf));
      if (n <= 0) {
        pipe_finish(pipe, n < 0 ? -errno : JV_EINVALID, write_where[1 - i]);
        return;
      }
      side->out.in_pipe -= (size_t) n;
      buf = uv_buf_init(splice_buf, (unsigned int) n);
      rc = jv_stream_write(other->stream, &buf, 1);
      if (rc != 0) {
        pipe_finish(pipe, rc, write_where[1 - i]);
        return;
      }
    }
  }

  splice_close(pipe);

  for (i = 0; i < 2 && !pipe->done; i++) {
    if (pipe->side[i].eof) {
      pipe->side[i].eof = 0;
      side_eof(&pipe->side[i]);
    }
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
}


/* Returns non-zero when both sockets are plain TCP with nothing queued,
 * which splice mode needs. */
static int
splice_possible(jv_pipe_t *pipe)
{
  int i;

  for (i = 0; i < 2; i++) {
    jv_stream_t *s = pipe->side[i].stream;

    if (s->ssl != NULL || s->uv.handle.type != UV_TCP ||
        s->write_queue != 0) {
      return 0;
    }
  }

  return 1;
}


/* Starts splice mode: dups each socket's fd, opens a kernel pipe per
 * direction and starts watching. Returns 0, or an error code after undoing
 * everything, and the pipe then stays in copy mode. */
static int
splice_enter(jv_pipe_t *pipe)
{
  int i, rc = 0, fds[2], size;
  uv_os_fd_t fd;

  for (i = 0; i < 2 && rc == 0; i++) {
    jv_pipe_side_t *side = &pipe->side[i];

    rc = uv_fileno(&side->stream->uv.handle, &fd);
    if (rc != 0) {
      break;
    }

    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
      rc = -errno;
      break;
    }
    side->out.pipe_r = fds[0];
    side->out.pipe_w = fds[1];

    size = fcntl(fds[0], F_GETPIPE_SZ);
    if (size < 4096) {
      rc = size < 0 ? -errno : JV_EINVALID;
      break;
    }
    side->out.capacity = (size_t) size;

    side->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (side->fd < 0) {
      rc = -errno;
      break;
    }

    rc = uv_poll_init(jv__loop(), &side->poll, side->fd);
    if (rc != 0) {
      close_fd(&side->fd);
      break;
    }
    side->poll.data = side;
    pipe->open_handles++;
  }

  if (rc != 0) {
    splice_close(pipe);
    return rc;
  }

  pipe->spliced = 1;
  splice_poll_update(pipe);
  return 0;
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
  int use_splice = 1;
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
    lua_getfield(L, 3, "splice");
    if (!lua_isnil(L, -1)) {
      use_splice = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
  }

  /* Park first: it raises outside a scheduler coroutine, and nothing has
   * been borrowed yet. */
  pipe = calloc(1, sizeof(*pipe));
  if (pipe == NULL) {
    return luaL_error(L, "out of memory");
  }

  pipe->ref = jv__co_park(L);
  pipe->starting = 1;
  for (i = 0; i < 2; i++) {
    pipe->side[i].sock_ref = LUA_NOREF;
    pipe->side[i].fd = -1;
    pipe->side[i].out.pipe_r = -1;
    pipe->side[i].out.pipe_w = -1;
  }

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
  pipe->open_handles = 1;
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

  /* NOTE: a pipe whose first writes queued bytes stays in copy mode. */
  if (!pipe->done && use_splice && splice_possible(pipe) &&
      splice_enter(pipe) == 0) {
    /* The polls report what the sockets already hold. */
  } else {
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
