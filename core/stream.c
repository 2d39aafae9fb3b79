/*
 * stream.c: byte streams over libuv with TLS through OpenSSL memory BIOs.
 *
 * Ciphertext read from the socket is fed into the read BIO; OpenSSL's
 * output (handshake records and encrypted application data) is drained
 * from the write BIO and written to the socket. Consumers only ever see
 * plaintext. Writes are tried synchronously (uv_try_write) and only the
 * remainder is copied, so a small response costs one syscall and no copy.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

enum {
  STREAM_READING = 1 << 0,
  STREAM_CLOSING = 1 << 1,
  STREAM_TLS_READY = 1 << 2,
  STREAM_SHUTDOWN_WANTED = 1 << 3,
  STREAM_SHUTDOWN_SENT = 1 << 4,
  STREAM_TLS_QUEUED = 1 << 5, /* on the deferred-delivery list */
  STREAM_FD = 1 << 6,
};

/* Reads are consumed before the read callback returns, so one buffer for
 * the whole process is enough; the TLS path decrypts into a second one. */
static char net_buf[65536];
static char plain_buf[65536];

/* TLS streams whose decrypted input waits because the consumer paused
 * reading. An idle callback delivers it once reading restarts, so
 * jv_stream_read_start never calls the read callback itself. */
static jv_stream_t *tls_pending;
static uv_idle_t tls_idle;
static int tls_idle_init;

typedef struct {
  uv_write_t req;
  jv_stream_t *stream;
  size_t len;
  char data[];
} jv_write_req_t;

static void tls_deliver(jv_stream_t *s);
static void tls_idle_cb(uv_idle_t *idle);
static void stream_finish_shutdown(jv_stream_t *s);


jv_stream_t *
jv_stream_new_tcp(void)
{
  jv_stream_t *s = calloc(1, sizeof(*s));

  if (s == NULL) {
    return NULL;
  }

  uv_tcp_init(jv__loop(), &s->uv.tcp);
  s->uv.handle.data = s;
  s->flags |= STREAM_TLS_READY;
  return s;
}


jv_stream_t *
jv_stream_new_fd(int fd, int *err)
{
  jv_stream_t *s = calloc(1, sizeof(*s));
  int rc;

  if (s == NULL) {
    *err = JV_ENOMEM;
    return NULL;
  }

  uv_pipe_init(jv__loop(), &s->uv.pipe, 0);
  rc = uv_pipe_open(&s->uv.pipe, fd);
  if (rc != 0) {
    *err = rc;
    /* The handle is initialised, so it must be closed, not freed. */
    s->uv.handle.data = s;
    uv_close(&s->uv.handle, (uv_close_cb) free);
    return NULL;
  }

  s->uv.handle.data = s;
  s->flags |= STREAM_TLS_READY | STREAM_FD;
  return s;
}


int
jv_stream_is_closing(jv_stream_t *s)
{
  return (s->flags & STREAM_CLOSING) != 0;
}


int
jv_stream_is_ready(jv_stream_t *s)
{
  return (s->flags & STREAM_TLS_READY) != 0;
}


static void
write_cb(uv_write_t *req, int status)
{
  jv_write_req_t *wr = (jv_write_req_t *) req;
  jv_stream_t *s = wr->stream;

  s->write_queue -= wr->len;
  free(wr);

  if (status < 0 && s->write_error == 0) {
    s->write_error = status;
  }

  if (s->write_queue == 0 && !(s->flags & STREAM_CLOSING)) {
    if (s->flags & STREAM_SHUTDOWN_WANTED) {
      stream_finish_shutdown(s);
    }

    if (s->drain_cb != NULL) {
      s->drain_cb(s);
    }
  }
}


/* Writes raw bytes to the socket: synchronously when nothing is queued,
 * copying whatever the kernel did not take. */
static int
raw_write(jv_stream_t *s, const uv_buf_t *bufs, unsigned nbufs)
{
  size_t total = 0, done = 0, off;
  jv_write_req_t *wr;
  uv_buf_t buf;
  unsigned i;
  int rc;

  if (s->write_error != 0) {
    return s->write_error;
  }

  for (i = 0; i < nbufs; i++) {
    total += bufs[i].len;
  }

  if (total == 0) {
    return 0;
  }

  if (s->write_queue == 0) {
    rc = uv_try_write(&s->uv.stream, bufs, nbufs);

    if (rc >= 0) {
      done = (size_t) rc;

    } else if (rc != UV_EAGAIN && rc != UV_ENOSYS) {
      s->write_error = rc;
      return rc;
    }

    if (done == total) {
      return 0;
    }
  }

  wr = malloc(sizeof(*wr) + (total - done));
  if (wr == NULL) {
    return JV_ENOMEM;
  }

  wr->stream = s;
  wr->len = total - done;
  off = 0;

  for (i = 0; i < nbufs; i++) {
    size_t len = bufs[i].len;
    const char *base = bufs[i].base;

    if (done >= len) {
      done -= len;
      continue;
    }

    memcpy(wr->data + off, base + done, len - done);
    off += len - done;
    done = 0;
  }

  buf = uv_buf_init(wr->data, (unsigned int) wr->len);
  rc = uv_write(&wr->req, &s->uv.stream, &buf, 1, write_cb);
  if (rc != 0) {
    free(wr);
    s->write_error = rc;
    return rc;
  }

  s->write_queue += wr->len;
  return 0;
}


/* Moves whatever OpenSSL produced into the socket. */
static int
tls_flush(jv_stream_t *s)
{
  char buf[16384];
  uv_buf_t b;
  int n, rc;

  while ((n = BIO_read(s->wbio, buf, sizeof(buf))) > 0) {
    b = uv_buf_init(buf, (unsigned int) n);
    rc = raw_write(s, &b, 1);
    if (rc != 0) {
      return rc;
    }
  }

  return 0;
}


static void
tls_fail(jv_stream_t *s, const char *call)
{
  unsigned long e = ERR_peek_last_error();
  char reason[256];

  jv__openssl_reason(e, reason, sizeof(reason));
  ERR_clear_error();

  if (s->tls_error == 0) {
    s->tls_error = JV_ETLS;
    jv_log(JV_LOG_WARN, "tls failure", "call", call, "reason",
           e ? reason : "peer closed or protocol error", NULL);
  }
}


int
jv_stream_write(jv_stream_t *s, const uv_buf_t *bufs, unsigned nbufs)
{
  unsigned i;
  int n, rc;

  if (s->flags & STREAM_CLOSING) {
    return JV_ECLOSED;
  }

  if (s->flags & (STREAM_SHUTDOWN_WANTED | STREAM_SHUTDOWN_SENT)) {
    return UV_EPIPE;
  }

  if (s->ssl == NULL) {
    return raw_write(s, bufs, nbufs);
  }

  if (!(s->flags & STREAM_TLS_READY)) {
    return JV_EBUSY;
  }

  if (s->tls_error != 0) {
    return s->tls_error;
  }

  for (i = 0; i < nbufs; i++) {
    if (bufs[i].len == 0) {
      continue;
    }

    /* A memory BIO never blocks, so SSL_write takes the whole buffer. */
    n = SSL_write(s->ssl, bufs[i].base, (int) bufs[i].len);
    if (n <= 0) {
      tls_fail(s, "SSL_write");
      return JV_ETLS;
    }

    rc = tls_flush(s);
    if (rc != 0) {
      return rc;
    }
  }

  return 0;
}


static void
alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
  jv_stream_t *s = handle->data;

  if (s->read_buf != NULL) {
    buf->base = s->read_buf;
    buf->len = s->read_buf_size;
    return;
  }

  buf->base = net_buf;
  buf->len = sizeof(net_buf);
}


static void
tls_queue(jv_stream_t *s)
{
  if (s->flags & STREAM_TLS_QUEUED) {
    return;
  }

  s->flags |= STREAM_TLS_QUEUED;
  s->tls_next = tls_pending;
  tls_pending = s;

  if (!tls_idle_init) {
    uv_idle_init(jv__loop(), &tls_idle);
    tls_idle_init = 1;
  }

  uv_idle_start(&tls_idle, tls_idle_cb);
}


static void
tls_unqueue(jv_stream_t *s)
{
  jv_stream_t **p;

  if (!(s->flags & STREAM_TLS_QUEUED)) {
    return;
  }

  for (p = &tls_pending; *p != NULL; p = &(*p)->tls_next) {
    if (*p == s) {
      *p = s->tls_next;
      break;
    }
  }

  s->flags &= ~STREAM_TLS_QUEUED;
}


static void
tls_idle_cb(uv_idle_t *idle)
{
  jv_stream_t *list = tls_pending;

  tls_pending = NULL;
  uv_idle_stop(idle);

  while (list != NULL) {
    jv_stream_t *s = list;

    list = s->tls_next;
    s->flags &= ~STREAM_TLS_QUEUED;

    if ((s->flags & STREAM_READING) && !(s->flags & STREAM_CLOSING)) {
      tls_deliver(s);
    }
  }
}


/* Decrypts and delivers buffered input until OpenSSL needs more bytes or
 * the consumer stops reading. */
static void
tls_deliver(jv_stream_t *s)
{
  int n, err;

  while ((s->flags & STREAM_READING) && !(s->flags & STREAM_CLOSING)) {
    n = SSL_read(s->ssl, plain_buf, sizeof(plain_buf));

    if (n > 0) {
      s->read_cb(s, n, plain_buf);
      continue;
    }

    err = SSL_get_error(s->ssl, n);
    tls_flush(s);

    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      ERR_clear_error();
      return;
    }

    if (err == SSL_ERROR_ZERO_RETURN) {
      ERR_clear_error();
      s->read_cb(s, UV_EOF, NULL);
      return;
    }

    tls_fail(s, "SSL_read");
    s->read_cb(s, JV_ETLS, NULL);
    return;
  }

  /* Input left behind a pause stays in OpenSSL's buffers; read_start
   * queues its delivery. */
}


static void
tls_handshake(jv_stream_t *s)
{
  int rc, err;

  rc = SSL_do_handshake(s->ssl);
  tls_flush(s);

  if (rc == 1) {
    s->flags |= STREAM_TLS_READY;
    if (s->handshake_cb != NULL) {
      s->handshake_cb(s, 0);
    }
    return;
  }

  err = SSL_get_error(s->ssl, rc);
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
    ERR_clear_error();
    return;
  }

  tls_fail(s, "SSL_do_handshake");

  if (s->handshake_cb != NULL) {
    s->handshake_cb(s, JV_ETLS);

  } else if (s->read_cb != NULL && (s->flags & STREAM_READING)) {
    s->read_cb(s, JV_ETLS, NULL);
  }
}


void
jv_stream_handshake(jv_stream_t *s)
{
  if (s->ssl != NULL && !(s->flags & STREAM_TLS_READY)) {
    tls_handshake(s);
  }
}


static void
read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
  jv_stream_t *s = stream->data;

  if (nread == 0) {
    return;
  }

  if (s->ssl == NULL) {
    if (nread < 0 && nread != UV_EOF && s->flags & STREAM_FD &&
        nread == UV_EIO) {
      /* A PTY master reports EIO once the slave side is closed. */
      nread = UV_EOF;
    }

    s->read_cb(s, nread, buf->base);
    return;
  }

  if (nread < 0) {
    if (!(s->flags & STREAM_TLS_READY) && s->handshake_cb != NULL) {
      s->handshake_cb(s, (int) nread);
      return;
    }

    s->read_cb(s, nread, NULL);
    return;
  }

  if (BIO_write(s->rbio, buf->base, (int) nread) != nread) {
    tls_fail(s, "BIO_write");
    s->read_cb(s, JV_ETLS, NULL);
    return;
  }

  if (!(s->flags & STREAM_TLS_READY)) {
    tls_handshake(s);

    if (!(s->flags & STREAM_TLS_READY) || (s->flags & STREAM_CLOSING)) {
      return;
    }
  }

  tls_deliver(s);
}


int
jv_stream_read_start(jv_stream_t *s, jv_stream_read_cb cb)
{
  int rc;

  if (s->flags & STREAM_CLOSING) {
    return JV_ECLOSED;
  }

  s->read_cb = cb;

  if (s->flags & STREAM_READING) {
    return 0;
  }

  rc = uv_read_start(&s->uv.stream, alloc_cb, read_cb);
  if (rc != 0 && rc != UV_EALREADY) {
    return rc;
  }

  s->flags |= STREAM_READING;

  if (s->ssl != NULL && (s->flags & STREAM_TLS_READY) &&
      (SSL_pending(s->ssl) > 0 || BIO_ctrl_pending(s->rbio) > 0)) {
    tls_queue(s);
  }

  return 0;
}


void
jv_stream_read_stop(jv_stream_t *s)
{
  if (s->flags & STREAM_READING) {
    s->flags &= ~STREAM_READING;
    if (!(s->flags & STREAM_CLOSING)) {
      uv_read_stop(&s->uv.stream);
    }
  }
}


static void
shutdown_cb(uv_shutdown_t *req, int status)
{
  free(req);
}


static void
stream_finish_shutdown(jv_stream_t *s)
{
  uv_shutdown_t *req;

  s->flags &= ~STREAM_SHUTDOWN_WANTED;
  s->flags |= STREAM_SHUTDOWN_SENT;

  req = malloc(sizeof(*req));
  if (req == NULL) {
    return;
  }

  if (uv_shutdown(req, &s->uv.stream, shutdown_cb) != 0) {
    free(req);
  }
}


int
jv_stream_shutdown(jv_stream_t *s)
{
  if (s->flags &
      (STREAM_CLOSING | STREAM_SHUTDOWN_SENT | STREAM_SHUTDOWN_WANTED)) {
    return 0;
  }

  if (s->ssl != NULL && (s->flags & STREAM_TLS_READY)) {
    SSL_shutdown(s->ssl);
    tls_flush(s);
    ERR_clear_error();
  }

  if (s->write_queue > 0) {
    s->flags |= STREAM_SHUTDOWN_WANTED;
    return 0;
  }

  stream_finish_shutdown(s);
  return 0;
}


static void
close_cb(uv_handle_t *handle)
{
  jv_stream_t *s = handle->data;

  if (s->close_cb != NULL) {
    s->close_cb(s);
  }

  if (s->ssl != NULL) {
    SSL_free(s->ssl); /* frees both BIOs */
  }

  free(s);
}


void
jv_stream_close(jv_stream_t *s, jv_stream_close_cb cb)
{
  if (s->flags & STREAM_CLOSING) {
    return;
  }

  s->flags |= STREAM_CLOSING;
  s->flags &= ~STREAM_READING;
  s->close_cb = cb;
  tls_unqueue(s);
  uv_close(&s->uv.handle, close_cb);
}


int
jv_stream_start_tls(jv_stream_t *s, SSL_CTX *ctx, int is_server,
                    const char *sni)
{
  SSL *ssl;

  if (s->ssl != NULL) {
    return JV_EBUSY;
  }

  ssl = SSL_new(ctx);
  if (ssl == NULL) {
    goto failed;
  }

  s->rbio = BIO_new(BIO_s_mem());
  s->wbio = BIO_new(BIO_s_mem());
  if (s->rbio == NULL || s->wbio == NULL) {
    BIO_free(s->rbio);
    BIO_free(s->wbio);
    s->rbio = s->wbio = NULL;
    SSL_free(ssl);
    goto failed;
  }

  /* An empty read BIO reports "retry", not end of file. */
  BIO_set_mem_eof_return(s->rbio, -1);
  BIO_set_mem_eof_return(s->wbio, -1);
  SSL_set_bio(ssl, s->rbio, s->wbio);

  if (is_server) {
    SSL_set_accept_state(ssl);

  } else {
    SSL_set_connect_state(ssl);

    if (sni != NULL && *sni != '\0') {
      if (SSL_set_tlsext_host_name(ssl, sni) != 1 ||
          SSL_set1_host(ssl, sni) != 1) {
        SSL_free(ssl);
        s->rbio = s->wbio = NULL;
        goto failed;
      }
    }
  }

  s->ssl = ssl;
  s->flags &= ~STREAM_TLS_READY;
  return 0;

failed:
  ERR_clear_error();
  return JV_ETLS;
}


/* Peeks at one byte of s's socket without waiting. Returns 1 for a byte,
 * 0 for an end of stream, JV_PEEK_EMPTY when nothing has arrived,
 * JV_PEEK_FAILED for an error (a reset, say) or a handle with no socket. */
#define JV_PEEK_EMPTY  (-1)
#define JV_PEEK_FAILED (-2)

static int
peek_byte(jv_stream_t *s)
{
  uv_os_fd_t fd;
  char c;
  ssize_t n;

  if (uv_fileno(&s->uv.handle, &fd) != 0) {
    return JV_PEEK_FAILED;
  }

  do {
    n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);

  if (n < 0) {
    return errno == EAGAIN || errno == EWOULDBLOCK ? JV_PEEK_EMPTY
                                                   : JV_PEEK_FAILED;
  }
  return n > 0;
}


int
jv_stream_peer_spoke(jv_stream_t *s)
{
  if (s->flags & STREAM_FD) {
    return 0;
  }
  if (s->ssl != NULL && SSL_pending(s->ssl) > 0) {
    return 1;
  }

  /* An end of stream, an error, or data no request asked for (a 408, or
   * a TLS close_notify sent before the close): all count. */
  return peek_byte(s) != JV_PEEK_EMPTY;
}


/* Returns 1 when the kernel has an end of stream or an error from the
 * peer and no byte before it: the peer closed or reset the connection.
 * Bytes waiting mean it is still talking (a pipelined request, or a TLS
 * record that may be a close_notify), so they give 0. */
int
jv_stream_peer_closed(jv_stream_t *s)
{
  int rc;

  if (s->flags & STREAM_FD) {
    return 0;
  }

  rc = peek_byte(s);
  return rc == 0 || rc == JV_PEEK_FAILED;
}


int
jv_stream_address(jv_stream_t *s, int peer, char *ip, size_t size, int *port)
{
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  int rc;

  if (s->flags & STREAM_FD) {
    return UV_ENOTSUP;
  }

  rc = peer ? uv_tcp_getpeername(&s->uv.tcp, (struct sockaddr *) &ss, &len)
            : uv_tcp_getsockname(&s->uv.tcp, (struct sockaddr *) &ss, &len);
  if (rc != 0) {
    return rc;
  }

  if (ss.ss_family == AF_INET6) {
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *) &ss;

    uv_ip6_name(a6, ip, size);
    *port = ntohs(a6->sin6_port);

  } else {
    struct sockaddr_in *a4 = (struct sockaddr_in *) &ss;

    uv_ip4_name(a4, ip, size);
    *port = ntohs(a4->sin_port);
  }

  return 0;
}


int
jv__parse_addr(const char *host, int port, struct sockaddr_storage *addr)
{
  memset(addr, 0, sizeof(*addr));

  if (port < 0 || port > 65535) {
    return UV_EINVAL;
  }

  if (strchr(host, ':') != NULL) {
    return uv_ip6_addr(host, port, (struct sockaddr_in6 *) addr);
  }

  return uv_ip4_addr(host, port, (struct sockaddr_in *) addr);
}
