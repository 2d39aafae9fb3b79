/*
 * internal.h: what the core's modules share with each other and not with Lua.
 * Names here use the jv__ prefix; nothing here is a stable interface.
 */
#ifndef JV_INTERNAL_H
#define JV_INTERNAL_H

#include "jv.h"

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#define JV_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* The loop every module runs on: uv_default_loop(), one per process. */
uv_loop_t *jv__loop(void);

/* Returns milliseconds of the loop's cached monotonic clock. */
uint64_t jv__now_ms(void);


/*
 * Error results across the C/Lua boundary. Misuse raises a Lua error;
 * an expected failure returns nil, message, code where code is the stable
 * name from jv_err_name(). jv__push_error pushes those three values and
 * returns 3 so a binding can `return jv__push_error(L, rc);`.
 */
int jv__push_error(lua_State *L, int code);

/* The same with a message of the caller's own; code names the class. */
int jv__push_error_msg(lua_State *L, int code, const char *message);


/*
 * Coroutine scheduler.
 *
 * Every entry from C into Lua runs in a coroutine that the scheduler starts
 * (jv__co_start). A binding that must wait for I/O parks the running
 * coroutine and yields; the I/O callback later pushes results onto the
 * parked thread and resumes it. Errors raised in a coroutine are logged with
 * a traceback and never end the process.
 *
 *   static int l_sleep(lua_State *L) {
 *     int ref = jv__co_park(L);          // raises if L cannot yield
 *     ... start a timer that remembers ref ...
 *     return lua_yield(L, 0);
 *   }
 *   static void on_timer(uv_timer_t *t) {
 *     lua_State *co = jv__co_thread(ref);
 *     lua_pushboolean(co, 1);
 *     jv__co_resume(ref, 1);
 *   }
 */

/* Anchors the running coroutine and returns a reference to resume it by.
 * Raises a Lua error when L is the main thread or a coroutine the scheduler
 * did not start (core.spawn or a core callback). */
int jv__co_park(lua_State *L);

/* Returns the parked thread so the caller can push the resume values. */
lua_State *jv__co_thread(int ref);

/* Resumes the parked thread with nargs values from its stack and drops the
 * reference. Safe to call from any libuv callback. */
void jv__co_resume(int ref, int nargs);

/* Drops a parked thread without resuming it (its owner is gone). */
void jv__co_forget(int ref);

/* Starts function and nargs arguments on top of L's stack in a new
 * coroutine, popping them. The coroutine runs until it first waits.
 * A name labels its errors in the log. Returns 0, or -1 when the function
 * raised at once (already logged). */
int jv__co_start(lua_State *L, int nargs, const char *name);

/* Returns non-zero when L is a coroutine the scheduler may park. */
int jv__co_parkable(lua_State *L);

/* Like jv__co_resume, but on the next loop iteration: for wake-ups issued
 * from inside a running coroutine, so resumes never nest. */
void jv__co_resume_later(int ref, int nargs);

/* The state C uses for registry access: a thread anchored for the life of
 * the process, never a coroutine that may end. */
lua_State *jv__lua(void);

/* Logs a Lua error value with the traceback of thread co. */
void jv__co_log_error(lua_State *co, const char *where);


/*
 * Streams: a TCP socket, a pipe or a PTY master, with optional TLS.
 *
 * The stream hides TLS: reads deliver plaintext and writes take plaintext.
 * Writes are tried synchronously first and only the rest is copied and
 * queued, so the common case neither copies nor allocates. A stream is
 * malloc'd and freed by its close callback, never by a Lua __gc, because
 * libuv owns the handle memory until then.
 */
typedef struct jv_stream_s jv_stream_t;
struct ssl_st;
struct ssl_ctx_st;
struct bio_st;

/* nread > 0: that many plaintext bytes at data, valid during the call only.
 * nread < 0: an error code; UV_EOF for an orderly close by the peer. */
typedef void (*jv_stream_read_cb)(jv_stream_t *s, ssize_t nread,
                                  const char *data);
typedef void (*jv_stream_close_cb)(jv_stream_t *s);

struct jv_stream_s {
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } uv;
  struct ssl_st *ssl;  /* NULL for plaintext */
  struct bio_st *rbio; /* ciphertext in (network -> OpenSSL) */
  struct bio_st *wbio; /* ciphertext out (OpenSSL -> network) */
  jv_stream_read_cb read_cb;
  jv_stream_close_cb close_cb;
  size_t write_queue; /* bytes accepted but not yet in the kernel */
  void (*drain_cb)(jv_stream_t *s); /* called when write_queue reaches 0 */
  void (*handshake_cb)(jv_stream_t *s, int status); /* TLS done/failed */
  jv_stream_t *tls_next; /* list of TLS streams with buffered input */
  int write_error;       /* first failed write, reported on next use */
  char *read_buf;        /* socket reads land here, or NULL for a shared
                            64 KiB buffer */
  size_t read_buf_size;
  unsigned flags;
  int tls_error;
  void *data; /* owner */
};

/* Allocates a TCP stream on the loop; NULL when out of memory. */
jv_stream_t *jv_stream_new_tcp(void);

/* Allocates a stream over an open file descriptor (pipe or PTY master),
 * set non-blocking; the stream owns the fd. */
jv_stream_t *jv_stream_new_fd(int fd, int *err);

/* Starts TLS on a connected stream. sni may be NULL; for a client it is
 * also the name the certificate must match when the context verifies. */
int jv_stream_start_tls(jv_stream_t *s, struct ssl_ctx_st *ctx, int is_server,
                        const char *sni);

/* Drives a client handshake once connected: sends the ClientHello. The
 * server side needs no call, its handshake runs on the first read. */
void jv_stream_handshake(jv_stream_t *s);

int jv_stream_read_start(jv_stream_t *s, jv_stream_read_cb cb);
void jv_stream_read_stop(jv_stream_t *s);

/* Queues bytes for writing; returns 0 or an error code. The bytes are
 * copied if they cannot be written at once. */
int jv_stream_write(jv_stream_t *s, const uv_buf_t *bufs, unsigned nbufs);

/* Half-closes the write side once queued bytes are out. */
int jv_stream_shutdown(jv_stream_t *s);

/* Closes the stream; cb (may be NULL) runs before the memory is freed. */
void jv_stream_close(jv_stream_t *s, jv_stream_close_cb cb);

int jv_stream_is_closing(jv_stream_t *s);

/* Returns non-zero once the TLS handshake has completed (or for plain
 * streams, always). */
int jv_stream_is_ready(jv_stream_t *s);

/* Returns 1 when the kernel already has an end of stream, a reset or
 * unread bytes from the peer of an idle TCP stream, else 0. Peeks with
 * MSG_PEEK and consumes nothing. For fd streams returns 0. */
int jv_stream_peer_spoke(jv_stream_t *s);
int jv_stream_peer_closed(jv_stream_t *s);

/* Fills buf with the peer or local address as "ip" and the port; returns 0
 * or an error code. For fd streams returns UV_ENOTSUP. */
int jv_stream_address(jv_stream_t *s, int peer, char *ip, size_t size,
                      int *port);

/* Parses host (IPv4 or IPv6 literal) and port into addr. */
int jv__parse_addr(const char *host, int port, struct sockaddr_storage *addr);


/*
 * Lua sockets (metatable "justavps.sock"): a stream plus a read buffer and
 * the coroutines parked on it, with the methods read, readn, readuntil,
 * write, shutdown, close, settimeout, peername, sockname. The userdata
 * holds only a pointer, so the socket outlives a collected userdata until
 * its handle is closed.
 */
typedef struct jv_sock_s jv_sock_t;

/* Pushes a new socket userdata owning stream s. */
jv_sock_t *jv__sock_push(lua_State *L, jv_stream_t *s);

/* Returns the socket at index idx, raising when it is not one or when it
 * is closed and allow_closed is 0. */
jv_sock_t *jv__sock_check(lua_State *L, int idx, int allow_closed);

jv_stream_t *jv__sock_stream(jv_sock_t *sock);

/* Puts bytes back at the front of the socket's read buffer: used by the
 * HTTP server when it hands a connection over after an upgrade. */
int jv__sock_unread(jv_sock_t *sock, const char *data, size_t len);

/* Returns the unread bytes in the socket's buffer (valid until the next
 * call that reads or consumes) and their length in *len. */
const char *jv__sock_buffered(jv_sock_t *sock, size_t *len);

/* Drops the first n unread bytes. */
void jv__sock_consume(jv_sock_t *sock, size_t n);

/*
 * Lends the stream to C code that drives it with its own read and drain
 * callbacks (a pipe, a WebSocket relay): the socket stops reading and must
 * have no parked reader or writer. jv__sock_return gives it back; the
 * socket's methods work again and reading restarts on the next read.
 * Returns 0 or JV_EBUSY when a coroutine is parked on the socket.
 */
int jv__sock_lend(jv_sock_t *sock);
void jv__sock_return(jv_sock_t *sock);

/* Registers fn(arg) to run when the socket is closed while lent, before
 * the stream goes away: the borrower must stop using the stream and call
 * jv__sock_return. jv__sock_return clears it. */
void jv__sock_on_lent_close(jv_sock_t *sock, void (*fn)(void *arg), void *arg);


/*
 * Listeners: a bound TCP socket that hands each accepted connection, with
 * TLS started when a context is set, to on_stream. The Lua object
 * ("justavps.listener") has port(), address() and close().
 */
typedef struct jv_listener_s jv_listener_t;

struct jv_listener_s {
  uv_tcp_t tcp;
  struct ssl_ctx_st *tls; /* NULL for plaintext */
  int tls_ref;            /* keeps the Lua TLS context alive */
  int fn_ref;             /* Lua callback, for listeners that use one */
  void (*on_stream)(jv_listener_t *l, jv_stream_t *s);
  void (*on_close)(jv_listener_t *l);
  void *data;
  unsigned accepted;
  int closed;
};

/* Creates a listener bound to host:port and pushes its Lua object. The
 * caller sets on_stream (and data) before the loop runs again. Returns
 * NULL after pushing nil, message, code. tls_index is the stack index of a
 * TLS context or 0. */
jv_listener_t *jv__listener_push(lua_State *L, const char *host, int port,
                                 int backlog, int tls_index);

/* Stops accepting and closes the socket; in-flight connections stay. */
void jv__listener_close(jv_listener_t *l);

/* Returns the SSL_CTX of the TLS context at idx, raising when it is not
 * one. server is 1 when the context must be a server context. */
struct ssl_ctx_st *jv__tls_check(lua_State *L, int idx, int server);


/*
 * Signals, exit statuses and exec arguments, shared by proc.c (uv_spawn),
 * pty.c (forkpty) and signal.c.
 */
int jv__signal_number(const char *name);
const char *jv__signal_name(int signum);

/* Returns the signal number at idx (a name such as "SIGTERM" or a
 * number), raising on an unknown one. */
int jv__check_signal(lua_State *L, int idx);

/* A child's exit status and the coroutines waiting for it. */
typedef struct jv_exit_s jv_exit_t;
jv_exit_t *jv__exit_new(void);
void jv__exit_free(jv_exit_t *x);
int jv__exit_done(const jv_exit_t *x);
void jv__exit_set(jv_exit_t *x, int status, int signum);

/* Returns status and signal name when the child has exited, else parks
 * until it does or until the timeout at timeout_idx passes. */
int jv__exit_wait(lua_State *L, jv_exit_t *x, int timeout_idx);

/* Build NULL-terminated argv and environment arrays for exec from the
 * options table at opts, anchored on the Lua stack. */
char **jv__build_argv(lua_State *L, int opts, const char *file,
                      const char *argv0);
char **jv__build_env(lua_State *L, int opts, const char *term);


/* Starts OpenSSL without its error strings, which take about 500 KiB
 * once a provider loads. Called first by roles that must stay small at
 * idle (the daemon). */
void jv__openssl_no_strings(void);

/* Formats OpenSSL error e into buf as ERR_error_string_n does, loading
 * the error strings first if jv__openssl_no_strings kept them out. */
void jv__openssl_reason(unsigned long e, char *buf, size_t size);

/* Computes the HMAC-SHA256 under key of the n parts joined with sep, as
 * crypto.hmac_sha256_join does, into hex (64 lowercase digits, no NUL).
 * Returns 0, or -1 when OpenSSL fails. */
int jv__hmac_sha256_join_hex(const unsigned char *key, size_t key_len,
                             const char *sep, size_t sep_len,
                             const char *const *parts, const size_t *lens,
                             unsigned n, char *hex);

/* Returns the nonce cache (core.nonce.new) at idx, raising when it is not
 * one. jv__nonce_add records nonce in it as cache:check_and_add does, at
 * the wall clock's time: returns 0 when recorded, 1 when it is live
 * already, 2 when the cache is full, -1 for a malformed nonce or a
 * closed cache. */
void *jv__nonce_cache(lua_State *L, int idx);
int jv__nonce_add(void *cache, const char *nonce, size_t len);


/* Module openers: each pushes one table that lua_core.c stores in the core
 * table under the name in the comment. */
int jv__open_loop(lua_State *L);   /* core.* (spawn, sleep, now, run, ...) */
int jv__open_log(lua_State *L);    /* core.log */
int jv__open_crypto(lua_State *L); /* core.crypto */
int jv__open_nonce(lua_State *L);  /* core.nonce */
int jv__open_tcp(lua_State *L);    /* core.tcp */
int jv__open_tls(lua_State *L);    /* core.tls */
int jv__open_http(lua_State *L);   /* core.http */
int jv__open_ws(lua_State *L);     /* core.ws */
int jv__open_proc(lua_State *L);   /* core.proc */
int jv__open_pty(lua_State *L);    /* core.pty */
int jv__open_signal(lua_State *L); /* core.signal */
int jv__open_fs(lua_State *L);     /* core.fs */
int jv__open_pg(lua_State *L);     /* core.pg */
int jv__open_curl(lua_State *L);   /* core.curl */

#endif /* JV_INTERNAL_H */
