/*
 * http.c: the HTTP/1.1 server (core.http.listen).
 *
 * A request enters here: listener_connection_cb (tcp.c) accepts, on_stream
 * borrows the socket's stream for this file, and llhttp parses the head.
 * When the head is complete the parser pauses and the server runs the Lua
 * handler in a new coroutine with a request object. The body is parsed
 * only as the handler reads it, so a large upload is never buffered
 * whole, and the next pipelined request waits until this response is done
 * and its output has drained.
 *
 * Strictness: llhttp is built in strict mode and rejects Content-Length
 * together with Transfer-Encoding, duplicate Content-Length and chunk data
 * without its CRLF. Checks here reject a bare LF or a folded line in the
 * head, a missing or repeated Host, and any transfer coding but chunked.
 * Each rejection is an error status (400, 408, 413, 414, 431 or 501) with
 * Connection: close.
 */
#include "http_server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define JV_HTTP_SERVER_MT  "justavps.http_server"
#define JV_HTTP_REQUEST_MT "justavps.http_request"

static llhttp_settings_t parser_settings;
static char date_buf[40];
static time_t date_sec;
static char id_prefix[9];
static uint64_t id_counter;

/* Worker coroutines parked between requests, as registry references. At
 * most MAX_IDLE_WORKERS wait: a burst that needed more leaves the rest to
 * end. Each waiting worker keeps a Lua thread, about 1 KiB. */
#define MAX_IDLE_WORKERS 64

static struct {
  int refs[MAX_IDLE_WORKERS];
  int n;
} idle_workers;

static int worker_ref = LUA_NOREF;

/* The request metatable's address, for jv__check_udata. */
static const void *req_mt;

static void conn_read_cb(jv_stream_t *s, ssize_t nread, const char *data);
static void conn_close(jv_http_conn_t *c);
static void conn_next_request(jv_http_conn_t *c);
static void conn_resume_reader(jv_http_conn_t *c, int err);


const char *
jv__http_date(void)
{
  time_t now = time(NULL);
  struct tm tm;

  if (now != date_sec) {
    date_sec = now;
    gmtime_r(&now, &tm);
    strftime(date_buf, sizeof(date_buf), "%a, %d %b %Y %H:%M:%S GMT", &tm);
  }

  return date_buf;
}


const char *
jv__http_reason(int status)
{
  switch (status) {
  case 100:
    return "Continue";
  case 101:
    return "Switching Protocols";
  case 200:
    return "OK";
  case 201:
    return "Created";
  case 202:
    return "Accepted";
  case 204:
    return "No Content";
  case 206:
    return "Partial Content";
  case 301:
    return "Moved Permanently";
  case 302:
    return "Found";
  case 303:
    return "See Other";
  case 304:
    return "Not Modified";
  case 307:
    return "Temporary Redirect";
  case 308:
    return "Permanent Redirect";
  case 400:
    return "Bad Request";
  case 401:
    return "Unauthorized";
  case 403:
    return "Forbidden";
  case 404:
    return "Not Found";
  case 405:
    return "Method Not Allowed";
  case 408:
    return "Request Timeout";
  case 409:
    return "Conflict";
  case 410:
    return "Gone";
  case 411:
    return "Length Required";
  case 412:
    return "Precondition Failed";
  case 413:
    return "Content Too Large";
  case 414:
    return "URI Too Long";
  case 415:
    return "Unsupported Media Type";
  case 416:
    return "Range Not Satisfiable";
  case 417:
    return "Expectation Failed";
  case 422:
    return "Unprocessable Content";
  case 426:
    return "Upgrade Required";
  case 429:
    return "Too Many Requests";
  case 431:
    return "Request Header Fields Too Large";
  case 500:
    return "Internal Server Error";
  case 501:
    return "Not Implemented";
  case 502:
    return "Bad Gateway";
  case 503:
    return "Service Unavailable";
  case 504:
    return "Gateway Timeout";
  default:
    return "Unknown";
  }
}


/* ---- head storage ---- */

static int
head_append(jv_http_conn_t *c, const char *at, size_t len)
{
  size_t need = c->head_len + len;
  char *nb;

  if (need > c->server->limits.max_header_size) {
    return JV_ETOOLARGE;
  }

  if (need > c->head_cap) {
    size_t cap = c->head_cap ? c->head_cap * 2 : 1024;

    while (cap < need) {
      cap *= 2;
    }

    nb = realloc(c->head, cap);
    if (nb == NULL) {
      return JV_ENOMEM;
    }

    c->head = nb;
    c->head_cap = cap;
  }

  memcpy(c->head + c->head_len, at, len);
  c->head_len += len;
  return 0;
}


static jv_http_conn_t *
parser_conn(llhttp_t *p)
{
  return p->data;
}


/* Records why a callback stopped the parser; returns llhttp's error. */
static int
limit_hit(jv_http_conn_t *c, int status, const char *code, const char *message)
{
  c->reject_status = status;
  c->reject_code = code;
  c->reject_message = message;
  return -1;
}


static int
on_message_begin(llhttp_t *p)
{
  jv_http_conn_t *c = parser_conn(p);

  c->head_len = 0;
  c->url_off = 0;
  c->url_len = 0;
  c->nhdrs = 0;
  c->last_was_value = 0;
  c->body_len = 0;
  c->body_total = 0;
  c->body_done = 0;
  c->message_done = 0;
  return 0;
}


static int
on_url(llhttp_t *p, const char *at, size_t len)
{
  jv_http_conn_t *c = parser_conn(p);

  if (c->url_len + len > c->server->limits.max_url) {
    return limit_hit(c, 414, "uri_too_long", "request-target too long");
  }

  if (head_append(c, at, len) != 0) {
    return limit_hit(c, 431, "header_too_large", "request head too large");
  }

  c->url_len += (uint32_t) len;
  return 0;
}


static int
on_header_field(llhttp_t *p, const char *at, size_t len)
{
  jv_http_conn_t *c = parser_conn(p);
  jv_http_header_t *h;

  if (c->nhdrs == 0 || c->last_was_value) {
    if (c->nhdrs >= c->server->limits.max_headers) {
      return limit_hit(c, 431, "header_too_large", "too many header fields");
    }

    if (c->nhdrs == c->hdr_cap) {
      unsigned cap = c->hdr_cap ? c->hdr_cap * 2 : 16;
      jv_http_header_t *nh = realloc(c->hdrs, cap * sizeof(*nh));

      if (nh == NULL) {
        return limit_hit(c, 500, "internal", "out of memory");
      }

      c->hdrs = nh;
      c->hdr_cap = cap;
    }

    h = &c->hdrs[c->nhdrs++];
    h->name_off = (uint32_t) c->head_len;
    h->name_len = 0;
    h->value_off = 0;
    h->value_len = 0;
    c->last_was_value = 0;
  }

  h = &c->hdrs[c->nhdrs - 1];
  if (head_append(c, at, len) != 0) {
    return limit_hit(c, 431, "header_too_large", "request head too large");
  }

  h->name_len += (uint32_t) len;
  return 0;
}


static int
on_header_value(llhttp_t *p, const char *at, size_t len)
{
  jv_http_conn_t *c = parser_conn(p);
  jv_http_header_t *h = &c->hdrs[c->nhdrs - 1];

  if (!c->last_was_value) {
    h->value_off = (uint32_t) c->head_len;
    c->last_was_value = 1;
  }

  if (head_append(c, at, len) != 0) {
    return limit_hit(c, 431, "header_too_large", "request head too large");
  }

  h->value_len += (uint32_t) len;
  return 0;
}


const char *
jv__http_find_header(const char *head, const jv_http_header_t *hdrs, unsigned n,
                     const char *name, size_t *len)
{
  size_t nlen = strlen(name);
  unsigned i;

  for (i = 0; i < n; i++) {
    if (hdrs[i].name_len == nlen &&
        strncasecmp(head + hdrs[i].name_off, name, nlen) == 0) {
      *len = hdrs[i].value_len;
      return head + hdrs[i].value_off;
    }
  }

  return NULL;
}


/* Counts the header fields named name. */
static unsigned
count_headers(jv_http_conn_t *c, const char *name, const char **value,
              size_t *value_len)
{
  size_t nlen = strlen(name);
  unsigned i, n = 0;

  for (i = 0; i < c->nhdrs; i++) {
    if (c->hdrs[i].name_len == nlen &&
        strncasecmp(c->head + c->hdrs[i].name_off, name, nlen) == 0) {
      if (n++ == 0) {
        *value = c->head + c->hdrs[i].value_off;
        *value_len = c->hdrs[i].value_len;
      }
    }
  }

  return n;
}


/*
 * An HTTP/1.1 request carries exactly one Host (RFC 9112 section 3.2), and
 * the only transfer coding this server decodes is a lone "chunked": any
 * other list gets 501 rather than a guess (RFC 9112 section 6.1).
 */
static int
check_host_and_te(jv_http_conn_t *c, llhttp_t *p)
{
  const char *v = NULL;
  size_t len = 0;
  unsigned n;

  n = count_headers(c, "host", &v, &len);
  if (n > 1 || (n == 0 && p->http_major == 1 && p->http_minor >= 1)) {
    limit_hit(c, 400, "bad_request",
              "malformed request: missing or repeated Host header");
    return -1;
  }

  n = count_headers(c, "transfer-encoding", &v, &len);
  if (n > 1) {
    limit_hit(c, 400, "bad_request",
              "malformed request: repeated Transfer-Encoding header");
    return -1;
  }

  if (n == 1) {
    while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t')) {
      len--;
    }
    while (len > 0 && (*v == ' ' || *v == '\t')) {
      v++;
      len--;
    }
    if (len != 7 || strncasecmp(v, "chunked", 7) != 0) {
      limit_hit(c, 501, "unsupported_transfer_encoding",
                "only Transfer-Encoding: chunked is supported");
      return -1;
    }
  }

  return 0;
}


static int
on_headers_complete(llhttp_t *p)
{
  jv_http_conn_t *c = parser_conn(p);
  const char *v;
  size_t len;

  if ((p->flags & F_CONTENT_LENGTH) &&
      p->content_length > c->server->limits.max_body) {
    return limit_hit(c, 413, "too_large", "request body too large");
  }

  if (check_host_and_te(c, p) != 0) {
    return -1;
  }

  v = jv__http_find_header(c->head, c->hdrs, c->nhdrs, "expect", &len);
  c->expect_continue =
      (v != NULL && len == 12 && strncasecmp(v, "100-continue", 12) == 0);
  c->is_head = (p->method == HTTP_HEAD);

  if (!(p->flags & F_CHUNKED) &&
      !((p->flags & F_CONTENT_LENGTH) && p->content_length > 0)) {
    /* No body: let the message complete, which pauses the parser. */
    return 0;
  }

  /* Stop here: the handler runs before any body byte is parsed. */
  return HPE_PAUSED;
}


static int
on_body(llhttp_t *p, const char *at, size_t len)
{
  jv_http_conn_t *c = parser_conn(p);
  size_t need;
  char *nb;

  c->body_total += len;
  if (c->body_total > c->server->limits.max_body) {
    return limit_hit(c, 413, "too_large", "request body too large");
  }

  if (c->discard_body) {
    return 0;
  }

  need = c->body_len + len;
  if (need > c->body_cap) {
    size_t cap = c->body_cap ? c->body_cap * 2 : 16384;

    while (cap < need) {
      cap *= 2;
    }

    nb = realloc(c->body, cap);
    if (nb == NULL) {
      return limit_hit(c, 500, "internal", "out of memory");
    }

    c->body = nb;
    c->body_cap = cap;
  }

  memcpy(c->body + c->body_len, at, len);
  c->body_len += len;

  /* No llhttp_pause here: llhttp allows pausing only from the message
   * and head callbacks. conn_read_cb stops reading at the high-water
   * mark instead, which bounds the buffer at that plus one read. */
  return 0;
}


/* Chunk extensions carry nothing this server uses; bound them so a peer
 * cannot keep the parser busy with an endless one. */
#define HTTP_MAX_CHUNK_EXTENSION 1024

static int
on_chunk_extension(llhttp_t *p, const char *at, size_t len)
{
  jv_http_conn_t *c = parser_conn(p);

  c->ext_len += len;
  if (c->ext_len > HTTP_MAX_CHUNK_EXTENSION) {
    return limit_hit(c, 400, "bad_request",
                     "malformed request: chunk extension too long");
  }

  return 0;
}


static int
on_chunk_header(llhttp_t *p)
{
  parser_conn(p)->ext_len = 0;
  return 0;
}


static int
on_message_complete(llhttp_t *p)
{
  jv_http_conn_t *c = parser_conn(p);

  c->body_done = 1;
  c->message_done = 1;

  /* One request at a time: the next pipelined one waits in pending. */
  return HPE_PAUSED;
}


/* ---- writing ---- */

static int
conn_write(jv_http_conn_t *c, const uv_buf_t *bufs, unsigned n)
{
  unsigned i;
  int rc;

  rc = jv_stream_write(c->stream, bufs, n);
  if (rc == 0) {
    for (i = 0; i < n; i++) {
      c->bytes_sent += bufs[i].len;
    }
  }

  return rc;
}


/* Writes a complete error response outside any handler and closes. */
static void
conn_reject(jv_http_conn_t *c, int status, const char *code,
            const char *message)
{
  char buf[512];
  char body[256];
  uv_buf_t b[2];
  int blen, hlen;

  blen = snprintf(body, sizeof(body),
                  "{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}\n", code,
                  message);
  hlen = snprintf(buf, sizeof(buf),
                  "HTTP/1.1 %d %s\r\nDate: %s\r\n"
                  "Content-Type: application/json\r\n"
                  "Content-Length: %d\r\nConnection: close\r\n\r\n",
                  status, jv__http_reason(status), jv__http_date(), blen);

  b[0] = uv_buf_init(buf, (unsigned) hlen);
  b[1] = uv_buf_init(body, (unsigned) blen);
  c->status = status;
  conn_write(c, b, 2);

  {
    char st[8];

    snprintf(st, sizeof(st), "%d", status);
    jv_log(JV_LOG_WARN, "request rejected", "status", st, "code", code,
           "reason", message, NULL);
  }
  jv_stream_shutdown(c->stream);
  conn_close(c);
}


static void
conn_parse_error(jv_http_conn_t *c, llhttp_errno_t err)
{
  const char *reason = llhttp_get_error_reason(&c->parser);
  char msg[160];
  size_t i;

  if (c->head_sent || c->response_done) {
    /* A response already went out for this request: a second one would
     * be taken as the response to the client's next request. */
    jv_log(JV_LOG_WARN, "request body rejected after the response", "reason",
           c->reject_status ? c->reject_message : llhttp_errno_name(err), NULL);
    conn_close(c);
    return;
  }

  if (c->reject_status != 0) {
    conn_reject(c, c->reject_status, c->reject_code, c->reject_message);
    return;
  }

  /* llhttp reasons are fixed ASCII text; keep them JSON-safe anyway. */
  snprintf(msg, sizeof(msg), "malformed request: %s",
           reason ? reason : llhttp_errno_name(err));
  for (i = 0; msg[i] != '\0'; i++) {
    if (msg[i] == '"' || msg[i] == '\\' || (unsigned char) msg[i] < ' ') {
      msg[i] = ' ';
    }
  }

  conn_reject(c, 400, "bad_request", msg);
}


/* ---- parsing input ---- */

static int
pending_set(jv_http_conn_t *c, const char *data, size_t len)
{
  char *nb;

  if (len > c->pending_cap) {
    nb = malloc(len);
    if (nb == NULL) {
      return JV_ENOMEM;
    }
    free(c->pending);
    c->pending = nb;
    c->pending_cap = len;
  }

  if (len > 0) {
    memmove(c->pending, data, len);
  }
  c->pending_len = len;
  return 0;
}


/* Keeps bytes that arrive while the parser is paused, to parse later. */
static int
pending_append(jv_http_conn_t *c, const char *data, size_t len)
{
  size_t need = c->pending_len + len;
  char *nb;

  if (need > c->pending_cap) {
    size_t cap = c->pending_cap ? c->pending_cap * 2 : 4096;

    while (cap < need) {
      cap *= 2;
    }

    nb = realloc(c->pending, cap);
    if (nb == NULL) {
      return JV_ENOMEM;
    }

    c->pending = nb;
    c->pending_cap = cap;
  }

  memcpy(c->pending + c->pending_len, data, len);
  c->pending_len = need;
  return 0;
}


/*
 * Rejects a bare LF anywhere in a request head, and a line that starts
 * with a space or tab (obsolete line folding). A front end that splits
 * lines differently would see another header list than this server, which
 * is a request-smuggling gap. llhttp 8 accepts both unless built strict.
 * Returns -1 on either. Scanning stops at the blank line that ends the
 * head.
 */
static int
scan_head(jv_http_conn_t *c, const char *data, size_t len)
{
  size_t i = 0;

  if (c->head_scanned) {
    return 0;
  }

  while (i < len) {
    const char *nl = memchr(data + i, '\n', len - i);
    size_t end = nl != NULL ? (size_t) (nl - data) : len;

    if (jv__http_scan_line_bytes(&c->prev_byte, &c->crlf_run, &c->head_content,
                                 data + i, end - i) != 0) {
      return -1;
    }

    if (nl == NULL) {
      break;
    }

    if (c->prev_byte != '\r') {
      return -1;
    }

    /* Empty lines before the request line are skipped (RFC 9112
     * section 2.2), so they must not count as the end of the head. */
    if (c->head_content && ++c->crlf_run == 2) {
      c->head_scanned = 1;
      return 0;
    }

    c->prev_byte = '\n';
    i = end + 1;
  }

  return 0;
}


static void conn_dispatch(jv_http_conn_t *c);


/*
 * Runs the parser over data. Returns 0 when all was consumed, 1 when the
 * parser paused (the rest is saved in pending), -1 after rejecting the
 * request (the connection is closing).
 */
static int
conn_execute(jv_http_conn_t *c, const char *data, size_t len)
{
  llhttp_errno_t err;
  const char *pos;
  size_t used;

  if (c->state == CONN_HEAD && scan_head(c, data, len) != 0) {
    conn_reject(c, 400, "bad_request",
                "malformed request: bare LF or "
                "folded line in request head");
    return -1;
  }

  err = llhttp_execute(&c->parser, data, len);

  if (err == HPE_OK) {
    c->pending_len = 0;
    return 0;
  }

  if (err == HPE_PAUSED || err == HPE_PAUSED_UPGRADE) {
    pos = llhttp_get_error_pos(&c->parser);
    used = pos != NULL ? (size_t) (pos - data) : len;

    if (err == HPE_PAUSED_UPGRADE) {
      c->upgrade = 1;
    }

    c->paused = 1;
    if (pending_set(c, data + used, len - used) != 0) {
      conn_reject(c, 500, "internal", "out of memory");
      return -1;
    }

    return 1;
  }

  conn_parse_error(c, err);
  return -1;
}


/* Resumes a paused parser over the pending bytes. */
static int
conn_unpause(jv_http_conn_t *c)
{
  if (!c->paused) {
    return 0;
  }

  c->paused = 0;
  if (c->upgrade) {
    return 1;
  }

  llhttp_resume(&c->parser);

  if (c->pending_len == 0) {
    return 0;
  }

  /* conn_execute may overwrite pending with its own tail: it moves bytes
   * with memmove within the same buffer, so passing pending is safe. */
  return conn_execute(c, c->pending, c->pending_len);
}


static void
conn_timer_cb(uv_timer_t *t)
{
  jv_http_conn_t *c = t->data;

  if (c->passing) {
    jv__pass_tick(c);
    return;
  }

  if (c->state == CONN_HANDLER) {
    if (c->response_done) {
      /* Skipping a body that stopped arriving. */
      conn_close(c);

    } else if (c->reader_ref != LUA_NOREF) {
      jv_stream_read_stop(c->stream);
      conn_resume_reader(c, JV_ETIMEOUT);
    }
    return;
  }

  if (c->wait_drain) {
    /* The client stopped reading its responses. */
    conn_close(c);
    return;
  }

  if (c->state == CONN_HEAD) {
    if (c->head_started) {
      conn_reject(c, 408, "request_timeout",
                  "request head not received "
                  "in time");

    } else {
      conn_close(c);
    }
  }
}


static void
conn_arm_timer(jv_http_conn_t *c, double seconds)
{
  if (seconds > 0) {
    uv_timer_start(&c->timer, conn_timer_cb, (uint64_t) (seconds * 1000), 0);
  }
}


static void
conn_read_cb(jv_stream_t *s, ssize_t nread, const char *data)
{
  jv_http_conn_t *c = s->data;
  int rc;

  if (nread < 0) {
    if (c->state == CONN_HANDLER && c->response_done) {
      /* The peer left while the rest of its body was being skipped. */
      conn_close(c);
      return;
    }

    if (c->state == CONN_HANDLER) {
      /* The response may still go out: a client may half-close after
       * its last request. */
      c->peer_eof = 1;
      jv_stream_read_stop(c->stream);
      conn_resume_reader(c, (int) nread);
      return;
    }

    conn_close(c);
    return;
  }

  if (c->paused) {
    /* A handler owns the connection and the parser waits for it. Reading
     * goes on, so the socket stays registered with epoll between
     * requests, and bytes queue here up to the high-water mark. */
    if (pending_append(c, data, (size_t) nread) != 0) {
      conn_close(c);
      return;
    }

    if (c->pending_len >= HTTP_BODY_HIGH_WATER) {
      jv_stream_read_stop(c->stream);
    }
    return;
  }

  if (c->state == CONN_HEAD) {
    c->head_started = 1;
  }

  rc = conn_execute(c, data, (size_t) nread);
  if (rc < 0) {
    return;
  }

  if (c->state == CONN_HEAD) {
    if (rc == 1) {
      conn_dispatch(c);
    }
    return;
  }

  /* In a handler: body bytes arrived for a parked reader. */
  if (c->body_len >= HTTP_BODY_HIGH_WATER ||
      (c->paused && c->pending_len >= HTTP_BODY_HIGH_WATER)) {
    jv_stream_read_stop(c->stream);
  }

  if (c->body_len > 0 || c->body_done) {
    conn_resume_reader(c, 0);
  }
}


/* ---- connection life cycle ---- */

static void
conn_free(jv_http_conn_t *c)
{
  free(c->out);
  free(c->head);
  free(c->hdrs);
  free(c->pending);
  free(c->body);
  free(c);
}


static void
conn_timer_closed(uv_handle_t *h)
{
  jv_http_conn_t *c = h->data;

  if (--c->handles == 0) {
    conn_free(c);
  }
}


static void
drain_timer_closed(uv_handle_t *h)
{
  free(h);
}


static void
server_maybe_drained(jv_http_server_t *srv)
{
  int ref;
  lua_State *co;

  if (srv->drain_ref == LUA_NOREF || srv->nconns > 0) {
    return;
  }

  if (srv->drain_timer != NULL) {
    uv_close((uv_handle_t *) srv->drain_timer, drain_timer_closed);
    srv->drain_timer = NULL;
  }

  ref = srv->drain_ref;
  srv->drain_ref = LUA_NOREF;
  co = jv__co_thread(ref);
  lua_pushboolean(co, !srv->drain_timed_out);
  jv__co_resume_later(ref, 1);
}


static void
conn_end_request_object(jv_http_conn_t *c)
{
  if (c->box != NULL) {
    c->box->conn = NULL;
    c->box = NULL;
  }

  if (c->req_ref != LUA_NOREF) {
    luaL_unref(jv__lua(), LUA_REGISTRYINDEX, c->req_ref);
    c->req_ref = LUA_NOREF;
  }
}


static void
conn_close(jv_http_conn_t *c)
{
  jv_http_server_t *srv = c->server;
  lua_State *L = jv__lua();

  if (c->state == CONN_CLOSING) {
    return;
  }

  if (c->state == CONN_HANDLER) {
    srv->nbusy--;
  }

  c->state = CONN_CLOSING;
  if (c->pass != NULL) {
    jv__pass_conn_closed(c);
  }
  conn_resume_reader(c, JV_ECLOSED);

  if (c->writer_ref != LUA_NOREF) {
    int ref = c->writer_ref;
    lua_State *co = jv__co_thread(ref);

    c->writer_ref = LUA_NOREF;
    jv__push_error(co, JV_ECLOSED);
    jv__co_resume_later(ref, 3);
  }

  conn_end_request_object(c);

  /* Unlink. */
  if (c->prev != NULL) {
    c->prev->next = c->next;

  } else {
    srv->conns = c->next;
  }

  if (c->next != NULL) {
    c->next->prev = c->prev;
  }

  srv->nconns--;

  if (!c->hijacked) {
    /* Close through the socket so its own bookkeeping runs. */
    jv__sock_return(c->sock);
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->sock_ref);
    lua_getfield(L, -1, "close");
    lua_insert(L, -2);
    lua_call(L, 1, 0);
  }

  luaL_unref(L, LUA_REGISTRYINDEX, c->sock_ref);
  c->sock_ref = LUA_NOREF;

  uv_close((uv_handle_t *) &c->timer, conn_timer_closed);
  server_maybe_drained(srv);
}


static void
conn_drain_cb(jv_stream_t *s)
{
  jv_http_conn_t *c = s->data;
  int ref = c->writer_ref;
  lua_State *co;

  if (c->passing) {
    jv__pass_drained(c);
    return;
  }

  if (c->wait_drain && c->state == CONN_HEAD) {
    c->wait_drain = 0;
    conn_next_request(c);
    return;
  }

  if (ref == LUA_NOREF) {
    return;
  }

  c->writer_ref = LUA_NOREF;
  co = jv__co_thread(ref);
  lua_pushboolean(co, 1);
  jv__co_resume(ref, 1);
}


static void
on_stream(jv_listener_t *l, jv_stream_t *s)
{
  jv_http_server_t *srv = l->data;
  lua_State *L = jv__lua();
  jv_http_conn_t *c;

  if (srv->draining) {
    jv_stream_close(s, NULL);
    return;
  }

  if (srv->limits.max_connections > 0 &&
      srv->nconns >= srv->limits.max_connections) {
    /* Refusing one connection keeps the others served; a log line per
     * refusal would let a flood fill the log, so only count them. */
    srv->refused++;
    jv_stream_close(s, NULL);
    return;
  }

  c = calloc(1, sizeof(*c));
  if (c == NULL) {
    jv_log(JV_LOG_ALERT, "out of memory accepting a connection", NULL);
    jv_stream_close(s, NULL);
    return;
  }

  c->server = srv;
  c->reader_ref = LUA_NOREF;
  c->writer_ref = LUA_NOREF;
  c->req_ref = LUA_NOREF;

  c->sock = jv__sock_push(L, s);
  c->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  jv__sock_lend(c->sock);
  c->stream = s;
  s->data = c;
  s->drain_cb = conn_drain_cb;

  uv_timer_init(jv__loop(), &c->timer);
  c->timer.data = c;
  c->handles = 1;

  llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
  c->parser.data = c;

  c->next = srv->conns;
  if (srv->conns != NULL) {
    srv->conns->prev = c;
  }
  srv->conns = c;
  srv->nconns++;

  c->state = CONN_HEAD;
  conn_arm_timer(c, srv->limits.header_timeout);

  if (jv_stream_read_start(s, conn_read_cb) != 0) {
    conn_close(c);
  }
}


/* ---- dispatch to Lua ---- */

static const char *
request_id(jv_http_conn_t *c)
{
  if (c->req_id[0] == '\0') {
    snprintf(c->req_id, sizeof(c->req_id), "%s%06llx", id_prefix,
             (unsigned long long) (++id_counter & 0xffffff));
  }

  return c->req_id;
}


static void
conn_dispatch(jv_http_conn_t *c)
{
  jv_http_server_t *srv = c->server;

  uv_timer_stop(&c->timer);
  c->state = CONN_HANDLER;
  srv->nbusy++;
  c->requests++;
  c->start_ms = uv_now(jv__loop());
  c->status = 0;
  c->bytes_sent = 0;
  c->head_sent = 0;
  c->chunked = 0;
  c->response_done = 0;
  c->continue_sent = 0;
  c->discard_body = 0;
  c->keep_alive = llhttp_should_keep_alive(&c->parser) && !srv->draining;
  c->req_id[0] = '\0'; /* made on first use: most requests never ask */
  c->pass_failed = 0;
  c->pass_seen = jv__pass_generation();

  if (srv->pass != NULL && jv__pass_try(c)) {
    return;
  }

  jv__http_conn_to_lua(c);
}


/* Runs the server's Lua handler on c's request, in an idle worker
 * coroutine or a new one. */
void
jv__http_conn_to_lua(jv_http_conn_t *c)
{
  jv_http_server_t *srv = c->server;
  lua_State *L = jv__lua();
  jv_http_req_box_t *box;

  box = lua_newuserdata(L, sizeof(*box));
  box->conn = c;
  c->box = box;
  luaL_getmetatable(L, JV_HTTP_REQUEST_MT);
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  c->req_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  if (idle_workers.n > 0) {
    /* A worker coroutine that finished an earlier request waits in
     * next_request: hand it the handler and the request. */
    int ref = idle_workers.refs[--idle_workers.n];
    lua_State *co = jv__co_thread(ref);

    lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
    lua_xmove(L, co, 1);
    lua_xmove(L, co, 1);
    jv__co_resume(ref, 2);
    return;
  }

  lua_rawgeti(L, LUA_REGISTRYINDEX, worker_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, srv->handler_ref);
  lua_pushvalue(L, -3);
  lua_remove(L, -4);
  jv__co_start(L, 2, "http handler");
}


static void
access_log(jv_http_conn_t *c)
{
  char status[8], bytes[24], ms[24];
  const char *method = llhttp_method_name(c->parser.method);
  char url[256];
  size_t ulen = c->url_len < sizeof(url) - 1 ? c->url_len : sizeof(url) - 1;

  if (!c->server->access_log || !jv_log_enabled(JV_LOG_INFO)) {
    return;
  }

  memcpy(url, c->head + c->url_off, ulen);
  url[ulen] = '\0';

  /* Never log the query string: it may carry a token. */
  if (strchr(url, '?') != NULL) {
    *strchr(url, '?') = '\0';
  }

  snprintf(status, sizeof(status), "%d", c->status);
  snprintf(bytes, sizeof(bytes), "%llu", (unsigned long long) c->bytes_sent);
  snprintf(ms, sizeof(ms), "%llu",
           (unsigned long long) (uv_now(jv__loop()) - c->start_ms));
  jv_log(JV_LOG_INFO, "access", "req_id", request_id(c), "method", method,
         "path", url, "status", status, "bytes", bytes, "ms", ms, NULL);
}


/* Called when the response is complete: start the next request or close. */
static void
conn_response_done(jv_http_conn_t *c)
{
  c->response_done = 1;
  access_log(c);
  conn_end_request_object(c);

  if (c->state != CONN_HANDLER) {
    return;
  }

  c->server->nbusy--;
  c->state = CONN_HEAD;

  /* An upgrade request answered without switching protocols cannot go on:
   * what follows it on the wire is not HTTP the parser may read. */
  if (!c->keep_alive || c->upgrade || c->parser.upgrade) {
    jv_stream_shutdown(c->stream);
    conn_close(c);
    return;
  }

  if (!c->message_done) {
    if (c->expect_continue && !c->continue_sent) {
      /* The client may be holding the body back for a 100 Continue
       * that will not come: the connection cannot be reused. */
      jv_stream_shutdown(c->stream);
      conn_close(c);
      return;
    }

    /* Skip the unread rest of the body, then go on. */
    c->discard_body = 1;
    c->body_len = 0;
  }

  conn_next_request(c);
}


static void
conn_next_request(jv_http_conn_t *c)
{
  int rc;

  c->state = CONN_HEAD;
  c->head_scanned = 0;
  c->head_content = 0;
  c->crlf_run = 0;
  c->prev_byte = 0;
  c->head_started = c->pending_len > 0;

  if (!c->message_done && c->peer_eof) {
    /* The client left before the end of its body: nothing will come. */
    conn_close(c);
    return;
  }

  if (!c->message_done) {
    /* Discarding a body: parse until the message completes. */
    c->state = CONN_HANDLER;
    c->server->nbusy++;
    rc = conn_unpause(c);
    if (rc < 0) {
      return;
    }
    if (!c->message_done) {
      conn_arm_timer(c, c->server->limits.idle_timeout);
      jv_stream_read_start(c->stream, conn_read_cb);
      return;
    }
    c->server->nbusy--;
    c->state = CONN_HEAD;
  }

  if (c->server->draining) {
    jv_stream_shutdown(c->stream);
    conn_close(c);
    return;
  }

  c->discard_body = 0;

  if (c->stream->write_queue >= HTTP_WRITE_HIGH_WATER) {
    /* The client is not reading its responses: parse nothing more until
     * they drain, or a pipelining client could queue without bound. */
    c->wait_drain = 1;
    jv_stream_read_stop(c->stream);
    conn_arm_timer(c, c->server->limits.idle_timeout);
    return;
  }

  conn_arm_timer(c, c->server->limits.idle_timeout);

  rc = conn_unpause(c);
  if (rc < 0) {
    return;
  }

  if (rc == 1) {
    conn_dispatch(c);
    return;
  }

  if (c->peer_eof || jv_stream_read_start(c->stream, conn_read_cb) != 0) {
    conn_close(c);
  }
}


/* Hook for conn_read_cb while discarding a body after the response. */
static void
conn_resume_reader(jv_http_conn_t *c, int err)
{
  int ref = c->reader_ref;
  lua_State *co;
  size_t n;

  if (c->response_done && c->state == CONN_HANDLER && err == 0) {
    /* Discarding: body bytes are dropped by on_body. */
    if (c->message_done) {
      c->server->nbusy--;
      c->state = CONN_HEAD;
      c->discard_body = 0;
      conn_next_request(c);
    } else if (c->paused) {
      if (conn_unpause(c) >= 0 && !c->message_done) {
        jv_stream_read_start(c->stream, conn_read_cb);
      } else if (c->message_done) {
        conn_resume_reader(c, 0);
      }
    }
    return;
  }

  if (ref == LUA_NOREF) {
    return;
  }

  c->reader_ref = LUA_NOREF;
  uv_timer_stop(&c->timer);
  co = jv__co_thread(ref);

  if (err != 0 && c->body_len == 0) {
    jv__push_error(co, err);
    jv__co_resume(ref, 3);
    return;
  }

  if (c->body_len == 0) {
    lua_pushnil(co);
    jv__co_resume(ref, 1);
    return;
  }

  n = c->body_len;
  lua_pushlstring(co, c->body, n);
  c->body_len = 0;
  jv__co_resume(ref, 1);
}


/* ---- request object ---- */

static jv_http_conn_t *
check_req(lua_State *L)
{
  jv_http_req_box_t *box = jv__check_udata(L, 1, JV_HTTP_REQUEST_MT, &req_mt);

  if (box->conn == NULL) {
    luaL_error(L, "request is over: its response was sent or its "
                  "connection closed");
  }

  return box->conn;
}


static int
push_url_part(lua_State *L, jv_http_conn_t *c, int part)
{
  const char *url = c->head + c->url_off;
  const char *q = memchr(url, '?', c->url_len);

  if (part == 0) {
    lua_pushlstring(L, url, c->url_len);

  } else if (part == 1) {
    lua_pushlstring(L, url, q ? (size_t) (q - url) : c->url_len);

  } else if (q != NULL) {
    lua_pushlstring(L, q + 1, c->url_len - (size_t) (q - url) - 1);

  } else {
    lua_pushnil(L);
  }

  return 1;
}


/* req.method, req.target, req.path, req.query, req.version, req.id; any
 * other key looks up a method. */
static int
l_req_index(lua_State *L)
{
  jv_http_req_box_t *box = jv__check_udata(L, 1, JV_HTTP_REQUEST_MT, &req_mt);
  const char *key = luaL_checkstring(L, 2);
  jv_http_conn_t *c = box->conn;

  if (c != NULL) {
    switch (key[0]) {
    case 'm':
      if (strcmp(key, "method") == 0) {
        lua_pushstring(L, llhttp_method_name(c->parser.method));
        return 1;
      }
      break;
    case 't':
      if (strcmp(key, "target") == 0) {
        return push_url_part(L, c, 0);
      }
      break;
    case 'p':
      if (strcmp(key, "path") == 0) {
        return push_url_part(L, c, 1);
      }
      break;
    case 'q':
      if (strcmp(key, "query") == 0) {
        return push_url_part(L, c, 2);
      }
      break;
    case 'v':
      if (strcmp(key, "version") == 0) {
        lua_pushfstring(L, "%d.%d", c->parser.http_major, c->parser.http_minor);
        return 1;
      }
      break;
    case 'i':
      if (strcmp(key, "id") == 0) {
        lua_pushstring(L, request_id(c));
        return 1;
      }
      break;
    default:
      break;
    }
  }

  lua_pushnil(L);
  return 1;
}


/* req:header(name): the first value of a header, case-insensitive. */
static int
l_req_header(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  const char *name = luaL_checkstring(L, 2);
  const char *v;
  size_t len;

  v = jv__http_find_header(c->head, c->hdrs, c->nhdrs, name, &len);
  if (v == NULL) {
    lua_pushnil(L);

  } else {
    lua_pushlstring(L, v, len);
  }

  return 1;
}


/* req:headers(): a table of lower-case names to values; a repeated header
 * maps to an array of its values in order. */
/* req:header_count(name): the number of header fields named name, in any
 * case, and the value of the first one (nil when there is none), without
 * building a table. */
static int
l_req_header_count(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  const char *name = luaL_checkstring(L, 2);
  const char *v = NULL;
  size_t len = 0;
  unsigned n = count_headers(c, name, &v, &len);

  lua_pushinteger(L, (lua_Integer) n);
  if (n == 0) {
    lua_pushnil(L);

  } else {
    lua_pushlstring(L, v, len);
  }

  return 2;
}


/* req:has_header_prefix(prefix): true when a header field name starts
 * with prefix, compared without case. */
static int
l_req_has_header_prefix(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  size_t plen;
  const char *prefix = luaL_checklstring(L, 2, &plen);
  unsigned i;

  for (i = 0; i < c->nhdrs; i++) {
    if (c->hdrs[i].name_len >= plen &&
        strncasecmp(c->head + c->hdrs[i].name_off, prefix, plen) == 0) {
      lua_pushboolean(L, 1);
      return 1;
    }
  }

  lua_pushboolean(L, 0);
  return 1;
}


/* req:header_values(names): for each name of the list made by
 * core.http.header_names, in order, the value of the field when exactly
 * one field has that name (in any case), false when several do, or nil
 * when none does. One call and one pass over the head in place of a
 * req:header_count per name. */
static int
l_req_header_values(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  jv_http_names_t *names = jv__http_to_names(L, 2);
  int first[JV_HTTP_NAMES_MAX];
  unsigned char seen[JV_HTTP_NAMES_MAX];
  unsigned i;

  if (names == NULL) {
    return luaL_argerror(L, 2, "list from core.http.header_names expected");
  }

  memset(seen, 0, names->n);
  for (i = 0; i < c->nhdrs; i++) {
    int k = jv__http_names_find(names, c->head + c->hdrs[i].name_off,
                                c->hdrs[i].name_len);

    if (k >= 0 && seen[k] < 2) {
      if (seen[k]++ == 0) {
        first[k] = (int) i;
      }
    }
  }

  luaL_checkstack(L, (int) names->n, "too many header names");
  for (i = 0; i < names->n; i++) {
    if (seen[i] == 0) {
      lua_pushnil(L);

    } else if (seen[i] > 1) {
      lua_pushboolean(L, 0);

    } else {
      const jv_http_header_t *h = &c->hdrs[first[i]];

      lua_pushlstring(L, c->head + h->value_off, h->value_len);
    }
  }

  return (int) names->n;
}


static int
l_req_headers(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  jv__http_push_headers(L, c->head, c->hdrs, c->nhdrs);
  return 1;
}


/* req:header_list(): {{name, value}, ...} as received, names unchanged. */
static int
l_req_header_list(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  jv__http_push_header_list(L, c->head, c->hdrs, c->nhdrs);
  return 1;
}


static int
l_req_peer(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  if (!c->peer_known) {
    if (jv_stream_address(c->stream, 1, c->peer_ip, sizeof(c->peer_ip),
                          &c->peer_port) != 0) {
      lua_pushnil(L);
      return 1;
    }
    c->peer_known = 1;
  }

  lua_pushstring(L, c->peer_ip);
  lua_pushinteger(L, c->peer_port);
  return 2;
}


static int
send_continue(jv_http_conn_t *c)
{
  static const char line[] = "HTTP/1.1 100 Continue\r\n\r\n";
  uv_buf_t b = uv_buf_init((char *) line, sizeof(line) - 1);

  c->continue_sent = 1;
  return jv_stream_write(c->stream, &b, 1);
}


/*
 * req:read([max]): returns the next piece of the request body, at most max
 * bytes (default: whatever has arrived). It returns nil at the end of the
 * body, and nil, message, code when the connection closed or no byte
 * came within idle_timeout.
 */
static int
l_req_read(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  lua_Integer max = luaL_optinteger(L, 2, 0);
  size_t n;
  int rc;

  if (c->hijacked) {
    return luaL_error(L, "request was hijacked: read from the socket");
  }

  if (c->reader_ref != LUA_NOREF) {
    return luaL_error(L, "request body already has a coroutine reading");
  }

  if (c->expect_continue && !c->continue_sent && !c->head_sent) {
    send_continue(c);
  }

  if (c->body_len == 0 && !c->body_done) {
    rc = conn_unpause(c);
    if (rc < 0) {
      return jv__push_error(L, JV_ECLOSED);
    }
  }

  if (c->body_len > 0) {
    n = c->body_len;
    if (max > 0 && (size_t) max < n) {
      n = (size_t) max;
    }

    lua_pushlstring(L, c->body, n);
    memmove(c->body, c->body + n, c->body_len - n);
    c->body_len -= n;
    return 1;
  }

  if (c->body_done) {
    lua_pushnil(L);
    return 1;
  }

  rc = jv_stream_read_start(c->stream, conn_read_cb);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  /* A body that stops arriving ends the read with "timeout" after the
   * idle timeout. */
  conn_arm_timer(c, c->server->limits.idle_timeout);
  c->reader_ref = jv__co_park(L);
  return lua_yield(L, 0);
}


/* Set when out_add ran out of memory for a caller that gave no Lua
 * state to raise in. */
static int out_oom;

static void
out_add(lua_State *L, jv_http_conn_t *c, const char *data, size_t len)
{
  size_t need = c->out_len + len;
  char *nb;

  if (need > c->out_cap) {
    size_t cap = c->out_cap ? c->out_cap * 2 : 1024;

    while (cap < need) {
      cap *= 2;
    }

    nb = realloc(c->out, cap);
    if (nb == NULL) {
      if (L == NULL) {
        /* A caller outside Lua (http_pass.c) checks out_oom. */
        out_oom = 1;
        return;
      }
      luaL_error(L, "out of memory");
      return;
    }

    c->out = nb;
    c->out_cap = cap;
  }

  memcpy(c->out + c->out_len, data, len);
  c->out_len = need;
}


static void
out_str(lua_State *L, jv_http_conn_t *c, const char *s)
{
  out_add(L, c, s, strlen(s));
}


static void
out_uint(lua_State *L, jv_http_conn_t *c, uint64_t v)
{
  char digits[24];
  int i = (int) sizeof(digits);

  do {
    digits[--i] = (char) ('0' + v % 10);
    v /= 10;
  } while (v != 0);

  out_add(L, c, digits + i, sizeof(digits) - (size_t) i);
}


/* Appends "Name: value\r\n", raising on CR/LF injection. */
static void
add_header(lua_State *L, jv_http_conn_t *c, const char *name, size_t nlen,
           int value_index)
{
  size_t vlen;
  const char *v = lua_tolstring(L, value_index, &vlen);

  if (v == NULL) {
    luaL_error(L, "header %s: value must be a string or number", name);
  }

  if (!jv__http_value_ok(v, vlen)) {
    luaL_error(L, "header %s: value contains CR, LF or NUL", name);
  }

  out_add(L, c, name, nlen);
  out_add(L, c, ": ", 2);
  out_add(L, c, v, vlen);
  out_add(L, c, "\r\n", 2);
}


/*
 * Builds and writes the status line and headers. body_len >= 0 sets
 * Content-Length; -1 means the length is unknown (chunked on HTTP/1.1,
 * close-delimited on 1.0).
 */
static int
write_head(lua_State *L, jv_http_conn_t *c, int status, int headers_index,
           const char *body, size_t body_len, int has_body)
{
  int has_length = 0, has_te = 0, has_date = 0, has_conn = 0;
  int bodyless = (status < 200 || status == 204 || status == 304);
  uv_buf_t bufs[2];
  unsigned nbufs = 1;
  int rc;

  if (status < 100 || status > 999) {
    return luaL_error(L, "invalid status %d", status);
  }

  c->out_len = 0;
  out_add(L, c, "HTTP/1.1 ", 9);
  out_uint(L, c, (uint64_t) status);
  out_add(L, c, " ", 1);
  out_str(L, c, jv__http_reason(status));
  out_add(L, c, "\r\n", 2);

  if (headers_index != 0 && lua_istable(L, headers_index)) {
    lua_pushnil(L);
    while (lua_next(L, headers_index) != 0) {
      size_t nlen;
      const char *name;

      if (lua_type(L, -2) != LUA_TSTRING) {
        return luaL_error(L, "header names must be strings");
      }

      name = lua_tolstring(L, -2, &nlen);
      if (!jv__http_name_ok(name, nlen)) {
        return luaL_error(L, "invalid header name '%s'", name);
      }

      if (strcasecmp(name, "content-length") == 0) {
        has_length = 1;

      } else if (strcasecmp(name, "transfer-encoding") == 0) {
        has_te = 1;

      } else if (strcasecmp(name, "date") == 0) {
        has_date = 1;

      } else if (strcasecmp(name, "connection") == 0) {
        size_t vlen;
        const char *v = lua_tolstring(L, -1, &vlen);

        has_conn = 1;
        if (v != NULL && jv__http_list_has_token(v, vlen, "close", 5)) {
          c->keep_alive = 0;
        }
      }

      if (lua_istable(L, -1)) {
        int i, n = (int) lua_objlen(L, -1);

        for (i = 1; i <= n; i++) {
          lua_rawgeti(L, -1, i);
          add_header(L, c, name, nlen, lua_gettop(L));
          lua_pop(L, 1);
        }

      } else {
        add_header(L, c, name, nlen, lua_gettop(L));
      }

      lua_pop(L, 1);
    }
  }

  if (!has_date) {
    out_add(L, c, "Date: ", 6);
    out_str(L, c, jv__http_date());
    out_add(L, c, "\r\n", 2);
  }

  c->chunked = 0;
  if (!bodyless && !has_length && !has_te) {
    if (has_body) {
      out_add(L, c, "Content-Length: ", 16);
      out_uint(L, c, body_len);
      out_add(L, c, "\r\n", 2);

    } else if (c->parser.http_major == 1 && c->parser.http_minor >= 1) {
      out_str(L, c, "Transfer-Encoding: chunked\r\n");
      c->chunked = 1;

    } else {
      c->keep_alive = 0;
    }
  }

  if (c->server->draining) {
    c->keep_alive = 0;
  }

  if (!has_conn && status != 101) {
    if (!c->keep_alive) {
      out_str(L, c, "Connection: close\r\n");

    } else if (c->parser.http_major == 1 && c->parser.http_minor == 0) {
      out_str(L, c, "Connection: keep-alive\r\n");
    }
  }

  out_add(L, c, "\r\n", 2);

  {
    bufs[0] = uv_buf_init(c->out, (unsigned) c->out_len);
    if (has_body && body_len > 0 && !c->is_head && !bodyless) {
      bufs[1] = uv_buf_init((char *) body, (unsigned) body_len);
      nbufs = 2;
    }

    c->status = status;
    c->head_sent = 1;
    rc = conn_write(c, bufs, nbufs);
  }

  return rc;
}


static int
wait_drain(lua_State *L, jv_http_conn_t *c)
{
  if (c->stream->write_queue < HTTP_WRITE_HIGH_WATER) {
    lua_pushboolean(L, 1);
    return 1;
  }

  c->writer_ref = jv__co_park(L);
  return lua_yield(L, 0);
}


/*
 * req:respond(status [, headers [, body]]): sends a whole response with
 * Content-Length and ends the request. headers maps names to a string or
 * an array of strings.
 */
static int
l_req_respond(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  int status = (int) luaL_checkinteger(L, 2);
  size_t blen = 0;
  const char *body = luaL_optlstring(L, 4, NULL, &blen);
  int rc;

  if (c->head_sent) {
    return luaL_error(L, "response head already sent");
  }

  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
  }

  rc = write_head(L, c, status, lua_isnoneornil(L, 3) ? 0 : 3, body ? body : "",
                  blen, 1);
  conn_response_done(c);

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* req:send_head(status [, headers]): starts a streamed response. Without a
 * Content-Length header the body is sent chunked. */
static int
l_req_send_head(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  int status = (int) luaL_checkinteger(L, 2);
  int rc;

  if (c->head_sent) {
    return luaL_error(L, "response head already sent");
  }

  rc = write_head(L, c, status, lua_isnoneornil(L, 3) ? 0 : 3, NULL, 0, 0);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  if (status == 101) {
    c->upgrade = 1;
  }

  lua_pushboolean(L, 1);
  return 1;
}


/* req:write(data): sends part of a streamed body, waiting while the
 * client is slow. An empty string sends nothing. */
static int
l_req_write(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  char size_line[24];
  uv_buf_t bufs[3];
  int rc;

  if (!c->head_sent) {
    return luaL_error(L, "call send_head before write");
  }

  if (c->writer_ref != LUA_NOREF) {
    return luaL_error(L, "response already has a coroutine writing");
  }

  if (len == 0 || c->is_head) {
    lua_pushboolean(L, 1);
    return 1;
  }

  if (c->chunked) {
    int n = snprintf(size_line, sizeof(size_line), "%zx\r\n", len);

    bufs[0] = uv_buf_init(size_line, (unsigned) n);
    bufs[1] = uv_buf_init((char *) data, (unsigned) len);
    bufs[2] = uv_buf_init("\r\n", 2);
    rc = conn_write(c, bufs, 3);

  } else {
    bufs[0] = uv_buf_init((char *) data, (unsigned) len);
    rc = conn_write(c, bufs, 1);
  }

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  return wait_drain(L, c);
}


/* req:finish(): ends a streamed response (the last chunk when chunked). */
static int
l_req_finish(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  uv_buf_t b;
  int rc = 0;

  if (!c->head_sent) {
    return luaL_error(L, "call send_head before finish");
  }

  if (c->chunked && !c->is_head) {
    b = uv_buf_init("0\r\n\r\n", 5);
    rc = conn_write(c, &b, 1);
  }

  conn_response_done(c);

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * req:hijack(): takes the connection out of HTTP and returns its Lua
 * socket, with any bytes received after the request head unread in it.
 * Used for WebSocket and other upgrades after the 101 is written (or
 * before, to write it by hand). The request ends here.
 */
static int
l_req_hijack(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  jv_http_server_t *srv = c->server;
  lua_State *A = jv__lua();

  if (c->hijacked) {
    return luaL_error(L, "request already hijacked");
  }

  /* Each unread goes to the front of the socket's buffer, so the later
   * bytes (unparsed input) go back first and the body before them. */
  if (c->pending_len > 0) {
    jv__sock_unread(c->sock, c->pending, c->pending_len);
    c->pending_len = 0;
  }

  if (c->body_len > 0) {
    jv__sock_unread(c->sock, c->body, c->body_len);
    c->body_len = 0;
  }

  c->hijacked = 1;
  c->upgrade = 1;
  c->keep_alive = 0;
  if (c->status == 0) {
    c->status = 101;
  }

  access_log(c);
  jv__sock_return(c->sock);
  lua_rawgeti(A, LUA_REGISTRYINDEX, c->sock_ref);
  lua_xmove(A, L, 1);

  c->response_done = 1;
  conn_end_request_object(c);
  if (c->state == CONN_HANDLER) {
    srv->nbusy--;
    c->state = CONN_HEAD;
  }
  conn_close(c);
  return 1;
}


/* req:keepalive([flag]): reads or clears keep-alive for this response. */
/* req:abort(): ends the request without finishing its response: no last
 * chunk follows a chunked body, and the connection closes, so that the
 * client sees a cut rather than a complete response. For a proxy whose
 * upstream failed in the middle of the body. */
static int
l_req_abort(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  c->keep_alive = 0;
  conn_response_done(c);
  return 0;
}


static int
l_req_keepalive(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  if (lua_isboolean(L, 2) && !lua_toboolean(L, 2)) {
    c->keep_alive = 0;
  }

  lua_pushboolean(L, c->keep_alive);
  return 1;
}


/* req:peer_closed(): true once the client has closed its side of the
 * connection or reset it. For a handler that writes nothing for a long
 * time and so would not see a failed write. */
static int
l_req_peer_closed(lua_State *L)
{
  jv_http_req_box_t *box = jv__check_udata(L, 1, JV_HTTP_REQUEST_MT, &req_mt);
  jv_http_conn_t *c = box->conn;

  lua_pushboolean(L, c == NULL || c->peer_eof || c->stream == NULL ||
                         jv_stream_peer_closed(c->stream));
  return 1;
}


static int
l_req_is_upgrade(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  lua_pushboolean(L, c->parser.upgrade);
  return 1;
}


static int
l_req_head_sent(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);

  lua_pushboolean(L, c->head_sent);
  return 1;
}


/* req:_done(ok, status, headers, body): called by the handler wrapper when
 * the handler returns or raises. */
static int
l_req_done(lua_State *L)
{
  jv_http_req_box_t *box = jv__check_udata(L, 1, JV_HTTP_REQUEST_MT, &req_mt);
  jv_http_conn_t *c = box->conn;
  int ok = lua_toboolean(L, 2);

  if (c == NULL) {
    return 0; /* responded, hijacked or closed already */
  }

  if (ok && c->passing) {
    /* req:pass took the request: http_pass.c ends its response. */
    conn_end_request_object(c);
    return 0;
  }

  if (!ok) {
    jv_log(JV_LOG_ERR, "handler failed", "req_id", request_id(c), "error",
           lua_tostring(L, 3), NULL);

    if (c->head_sent) {
      /* A half-sent response cannot be repaired: cut the connection. */
      c->keep_alive = 0;
      conn_response_done(c);
      return 0;
    }

    lua_settop(L, 1);
    lua_pushinteger(L, 500);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "application/json");
    lua_setfield(L, -2, "Content-Type");
    lua_pushliteral(L, "{\"error\":{\"code\":\"internal\",\"message\":"
                       "\"internal server error\"}}\n");
    return l_req_respond(L);
  }

  if (c->head_sent) {
    return l_req_finish(L);
  }

  if (lua_type(L, 3) != LUA_TNUMBER) {
    jv_log(JV_LOG_ERR, "handler returned no response", "req_id", request_id(c),
           NULL);
    lua_settop(L, 1);
    lua_pushinteger(L, 500);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "application/json");
    lua_setfield(L, -2, "Content-Type");
    lua_pushliteral(L, "{\"error\":{\"code\":\"internal\",\"message\":"
                       "\"handler returned no response\"}}\n");
    return l_req_respond(L);
  }

  lua_remove(L, 2); /* req, status, headers, body */
  if (lua_isnil(L, 3)) {
    lua_remove(L, 3);
    lua_pushnil(L);
    lua_insert(L, 3);
  }
  return l_req_respond(L);
}


/* ---- proxy forwarding ---- */

/* RFC 9110 section 7.6.1 connection-specific fields, plus the legacy
 * Proxy-Connection and the proxy credentials, which are meant for this
 * hop. HOP_BY_HOP in lua/justavps/proxy.lua is the same list. */
#define HOP(name)                                                              \
  {                                                                            \
    name, sizeof(name) - 1                                                     \
  }

static const struct {
  const char *name;
  size_t len;
} hop_by_hop[] = {
  HOP("connection"),
  HOP("keep-alive"),
  HOP("proxy-connection"),
  HOP("te"),
  HOP("trailer"),
  HOP("transfer-encoding"),
  HOP("upgrade"),
  HOP("proxy-authorization"),
  HOP("proxy-authenticate"),
};


/* Compares a header name with a lower-case string literal, in any case. */
#define name_is(name, len, lower)                                              \
  ((len) == sizeof(lower) - 1 && strncasecmp((name), (lower), (len)) == 0)


/* Returns non-zero when a field of the head is named Connection. */
static int
has_connection(const char *head, const jv_http_header_t *hdrs, unsigned n)
{
  unsigned j;

  for (j = 0; j < n; j++) {
    if (name_is(head + hdrs[j].name_off, hdrs[j].name_len, "connection")) {
      return 1;
    }
  }

  return 0;
}


/* Returns non-zero unless header i is hop-by-hop or named in the value of
 * a Connection header of the same head. connection: has_connection of
 * the head, so that a head without one is not searched for each field. */
static int
is_end_to_end(const char *head, const jv_http_header_t *hdrs, unsigned n,
              unsigned i, int connection)
{
  const char *name = head + hdrs[i].name_off;
  size_t len = hdrs[i].name_len;
  unsigned j;

  for (j = 0; j < sizeof(hop_by_hop) / sizeof(hop_by_hop[0]); j++) {
    if (len == hop_by_hop[j].len &&
        strncasecmp(name, hop_by_hop[j].name, len) == 0) {
      return 0;
    }
  }

  if (!connection) {
    return 1;
  }

  for (j = 0; j < n; j++) {
    if (name_is(head + hdrs[j].name_off, hdrs[j].name_len, "connection") &&
        jv__http_list_has_token(head + hdrs[j].value_off, hdrs[j].value_len,
                                name, len)) {
      return 0;
    }
  }

  return 1;
}


/* Returns non-zero when the table at index t has a string key equal to
 * name in any case. */
static int
table_has_name(lua_State *L, int t, const char *name, size_t len)
{
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t klen;
      const char *key = lua_tolstring(L, -2, &klen);

      if (klen == len && strncasecmp(key, name, len) == 0) {
        lua_pop(L, 2);
        return 1;
      }
    }
    lua_pop(L, 1);
  }

  return 0;
}


/* Names of a set_headers or drop_headers table, gathered once per
 * forward_head call so that each received field is checked with string
 * compares instead of a walk over the Lua table. The strings stay valid
 * while the tables are on the stack. */
#define FORWARD_MAX_NAMES JV_HTTP_NAMES_MAX

typedef struct {
  const char *name;
  size_t len;
} jv_name_ref_t;

typedef struct {
  jv_name_ref_t names[FORWARD_MAX_NAMES];
  unsigned n;
  int overflow; /* more keys than fit: fall back to table_has_name */
} jv_name_set_t;


static void
name_set_add_table(lua_State *L, int t, jv_name_set_t *set)
{
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      if (set->n == FORWARD_MAX_NAMES) {
        set->overflow = 1;
        lua_pop(L, 2);
        return;
      }
      set->names[set->n].name = lua_tolstring(L, -2, &set->names[set->n].len);
      set->n++;
    }
    lua_pop(L, 1);
  }
}


/* Returns non-zero when name is in the set or, after an overflow, in
 * drop_names or a key of one of the tables at drop_index and set_index (0
 * for none). */
static int
name_set_has(lua_State *L, const jv_name_set_t *set,
             const jv_http_names_t *drop_names, int drop_index, int set_index,
             const char *name, size_t len)
{
  unsigned i;

  if (set->overflow) {
    return (drop_names != NULL &&
            jv__http_names_find(drop_names, name, len) >= 0) ||
           (drop_index != 0 && table_has_name(L, drop_index, name, len)) ||
           (set_index != 0 && table_has_name(L, set_index, name, len));
  }

  for (i = 0; i < set->n; i++) {
    if (set->names[i].len == len &&
        strncasecmp(set->names[i].name, name, len) == 0) {
      return 1;
    }
  }

  return 0;
}


/* Appends the set_headers entries of the table at set_index, skipping
 * false values, and records which framing headers they carry. */
static void
add_set_headers(lua_State *L, jv_http_conn_t *c, int set_index,
                int body_has_length, int *has_host, int *has_length,
                int *request_close)
{
  lua_pushnil(L);
  while (lua_next(L, set_index) != 0) {
    size_t nlen;
    const char *name;

    if (lua_type(L, -2) != LUA_TSTRING) {
      luaL_error(L, "set_headers: header names must be strings");
    }

    name = lua_tolstring(L, -2, &nlen);
    if (!jv__http_name_ok(name, nlen)) {
      luaL_error(L, "set_headers: invalid header name '%s'", name);
    }

    if (lua_toboolean(L, -1) == 0) {
      lua_pop(L, 1);
      continue;
    }

    if (name_is(name, nlen, "transfer-encoding")) {
      luaL_error(L, "set_headers: Transfer-Encoding is set from the "
                    "request's body framing and cannot be given");
    }

    if (name_is(name, nlen, "content-length")) {
      if (body_has_length) {
        /* The request's own length frames the body that follows. */
        lua_pop(L, 1);
        continue;
      }
      *has_length = 1;

    } else if (name_is(name, nlen, "host")) {
      *has_host = 1;

    } else if (name_is(name, nlen, "connection")) {
      size_t vlen;
      const char *v = lua_tolstring(L, -1, &vlen);

      if (v != NULL && jv__http_list_has_token(v, vlen, "close", 5)) {
        *request_close = 1;
      }
    }

    if (lua_istable(L, -1)) {
      int i, n = (int) lua_objlen(L, -1);

      for (i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        add_header(L, c, name, nlen, lua_gettop(L));
        lua_pop(L, 1);
      }

    } else {
      add_header(L, c, name, nlen, lua_gettop(L));
    }

    lua_pop(L, 1);
  }
}


/* Checks the extra_headers string of forward_head: complete lines of the
 * form "Name: value\r\n" with a valid name and no CR, LF or NUL in the
 * value. Raises on a malformed line or on a name that the framing rules
 * of forward_head own (Host, Content-Length and the hop-by-hop names). */
void
jv__http_check_header_lines(lua_State *L, const char *s, size_t len)
{
  size_t pos = 0;

  while (pos < len) {
    const char *line = s + pos;
    const char *colon = memchr(line, ':', len - pos);
    const char *end;
    size_t nlen, j;

    if (colon == NULL || !jv__http_name_ok(line, (size_t) (colon - line))) {
      luaL_error(L, "extra_headers: invalid header name at byte %d",
                 (int) pos + 1);
    }
    nlen = (size_t) (colon - line);

    if (name_is(line, nlen, "host") || name_is(line, nlen, "content-length")) {
      luaL_error(L,
                 "extra_headers: %s cannot be given here; use "
                 "set_headers",
                 nlen == 4 ? "Host" : "Content-Length");
    }
    for (j = 0; j < sizeof(hop_by_hop) / sizeof(hop_by_hop[0]); j++) {
      if (nlen == hop_by_hop[j].len &&
          strncasecmp(line, hop_by_hop[j].name, nlen) == 0) {
        luaL_error(L, "extra_headers: hop-by-hop header %s cannot be given",
                   hop_by_hop[j].name);
      }
    }

    /* The value runs to the first LF, so it contains no LF, and memchr finds a
     * CR or NUL in it faster than a loop over its bytes. */
    end = memchr(colon, '\n', len - (size_t) (colon - s));
    if (end == NULL || end[-1] != '\r' ||
        memchr(colon + 1, '\r', (size_t) (end - 1 - (colon + 1))) != NULL ||
        memchr(colon + 1, '\0', (size_t) (end - 1 - (colon + 1))) != NULL) {
      luaL_error(L,
                 "extra_headers: the line at byte %d must end with CRLF "
                 "and carry no CR, LF or NUL in its value",
                 (int) pos + 1);
    }

    pos = (size_t) (end + 1 - s);
  }
}


/* Appends "Host: " with host, bracketed when it is an IPv6 literal, and
 * the port unless it is 80. */
static void
add_default_host(lua_State *L, jv_http_conn_t *c, const char *host, size_t hlen,
                 lua_Integer port)
{
  int v6 = memchr(host, ':', hlen) != NULL;

  if (!jv__http_value_ok(host, hlen)) {
    luaL_error(L, "host contains CR, LF or NUL");
  }

  out_add(L, c, "Host: ", 6);
  if (v6) {
    out_add(L, c, "[", 1);
  }
  out_add(L, c, host, hlen);
  if (v6) {
    out_add(L, c, "]", 1);
  }
  if (port != 80) {
    out_add(L, c, ":", 1);
    out_uint(L, c, (uint64_t) port);
  }
  out_add(L, c, "\r\n", 2);
}


/*
 * req:forward_head(host, port [, target [, set_headers [, drop_headers
 *                  [, extra_headers]]]]):
 * builds the HTTP/1.1 head that forwards this request to host:port, from
 * the request's own head without Lua tables. It keeps the method, uses
 * target (default req.target) and copies the header fields as received,
 * minus hop-by-hop ones, those named in Connection, those in drop_headers
 * (a set of names, or a list from core.http.header_names) and those that
 * set_headers names. Then it adds
 * set_headers (name = value, an array of values, or false for none),
 * extra_headers (a string of complete "Name: value\r\n" lines, checked and
 * copied as they are; the caller drops received fields of those names),
 * Host (host:port) when no header gives one, and the body framing.
 * Names compare in any case, and copied fields keep their order and the
 * case of their names. Returns the head, the body mode ("none", "length"
 * or "chunked"), the body's Content-Length or nil, and whether the head
 * carries Connection: close.
 */
static int
l_req_forward_head(lua_State *L)
{
  jv_http_conn_t *c = check_req(L);
  size_t hlen, tlen, llen = 0;
  const char *host = luaL_checklstring(L, 2, &hlen);
  lua_Integer port = luaL_checkinteger(L, 3);
  const char *target, *method, *length;
  const char *mode = "none";
  int set_index = 0, drop_index = 0;
  int has_host = 0, has_length = 0, request_close = 0, connection;
  jv_name_set_t skip;
  jv_http_names_t *drop_names = NULL;
  unsigned i;

  skip.n = 0;
  skip.overflow = 0;
  luaL_argcheck(L, port >= 1 && port <= 65535, 3, "port must be 1 to 65535");

  if (lua_isnoneornil(L, 4)) {
    target = c->head + c->url_off;
    tlen = c->url_len;

  } else {
    target = luaL_checklstring(L, 4, &tlen);
    if (!jv__http_target_ok(target, tlen)) {
      return luaL_error(L, "invalid target: it must be non-empty, without "
                           "spaces or control characters");
    }
  }

  if (!lua_isnoneornil(L, 5)) {
    luaL_checktype(L, 5, LUA_TTABLE);
    set_index = 5;
  }

  if (!lua_isnoneornil(L, 6)) {
    drop_names = jv__http_to_names(L, 6);
    if (drop_names == NULL) {
      luaL_checktype(L, 6, LUA_TTABLE);
      drop_index = 6;
    }
  }

  /* The server accepts no transfer coding but chunked, and llhttp rejects
   * Content-Length together with Transfer-Encoding. */
  length =
      jv__http_find_header(c->head, c->hdrs, c->nhdrs, "content-length", &llen);
  if (length != NULL) {
    /* llhttp keeps trailing spaces of the value; it has checked the rest
     * is digits. */
    while (llen > 0 && (length[llen - 1] == ' ' || length[llen - 1] == '\t')) {
      llen--;
    }
    if (!(llen == 1 && length[0] == '0')) {
      mode = "length";
    }

  } else if (jv__http_find_header(c->head, c->hdrs, c->nhdrs,
                                  "transfer-encoding", &llen) != NULL) {
    mode = "chunked";
  }

  if (drop_index != 0) {
    name_set_add_table(L, drop_index, &skip);

  } else if (drop_names != NULL) {
    /* JV_HTTP_NAMES_MAX equals FORWARD_MAX_NAMES, so the names fit. */
    for (i = 0; i < drop_names->n; i++) {
      skip.names[i].name = drop_names->bytes + drop_names->off[i];
      skip.names[i].len = drop_names->len[i];
    }
    skip.n = drop_names->n;
  }
  if (set_index != 0 && !skip.overflow) {
    name_set_add_table(L, set_index, &skip);
  }

  connection = has_connection(c->head, c->hdrs, c->nhdrs);
  method = llhttp_method_name(c->parser.method);
  c->out_len = 0;
  out_str(L, c, method);
  out_add(L, c, " ", 1);
  out_add(L, c, target, tlen);
  out_add(L, c, " HTTP/1.1\r\n", 11);

  for (i = 0; i < c->nhdrs; i++) {
    const jv_http_header_t *h = &c->hdrs[i];
    const char *name = c->head + h->name_off;

    if (!is_end_to_end(c->head, c->hdrs, c->nhdrs, i, connection) ||
        name_set_has(L, &skip, drop_names, drop_index, set_index, name,
                     h->name_len)) {
      continue;
    }

    if (name_is(name, h->name_len, "content-length")) {
      if (mode[0] == 'l') {
        continue; /* added below with the body framing */
      }
      has_length = 1;

    } else if (name_is(name, h->name_len, "host")) {
      has_host = 1;
    }

    out_add(L, c, name, h->name_len);
    out_add(L, c, ": ", 2);
    out_add(L, c, c->head + h->value_off, h->value_len);
    out_add(L, c, "\r\n", 2);
  }

  if (set_index != 0) {
    add_set_headers(L, c, set_index, mode[0] == 'l', &has_host, &has_length,
                    &request_close);
  }

  if (!lua_isnoneornil(L, 7)) {
    size_t xlen;
    const char *extra = luaL_checklstring(L, 7, &xlen);

    jv__http_check_header_lines(L, extra, xlen);
    out_add(L, c, extra, xlen);
  }

  if (!has_host) {
    add_default_host(L, c, host, hlen, port);
  }

  if (mode[0] == 'l') {
    out_add(L, c, "Content-Length: ", 16);
    out_add(L, c, length, llen);
    out_add(L, c, "\r\n", 2);

  } else if (mode[0] == 'c') {
    out_str(L, c, "Transfer-Encoding: chunked\r\n");

  } else if (!has_length &&
             (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 ||
              strcmp(method, "PATCH") == 0)) {
    /* A server may reject a body-carrying method without a length with
     * 411 Length Required, even for an empty body. */
    out_str(L, c, "Content-Length: 0\r\n");
  }

  out_add(L, c, "\r\n", 2);

  lua_pushlstring(L, c->out, c->out_len);
  c->out_len = 0;
  lua_pushstring(L, mode);
  if (mode[0] == 'l') {
    /* The value is not NUL-terminated: the head buffer contains the next
     * field, or bytes of an earlier head, right after it. llhttp has
     * checked that it is all digits. */
    uint64_t n = 0;

    for (i = 0; i < llen; i++) {
      n = n * 10 + (uint64_t) (length[i] - '0');
    }
    lua_pushnumber(L, (lua_Number) n);

  } else {
    lua_pushnil(L);
  }
  lua_pushboolean(L, request_close);
  return 4;
}


static void relay_head_into(lua_State *L, jv_http_conn_t *c, int status,
                            const char *head, const jv_http_header_t *hdrs,
                            unsigned n);

/* Builds the relayed response head into c->out (see jv__http_relay_head).
 * Returns the connection, or raises. */
static jv_http_conn_t *
build_relay_head(lua_State *L, int req_index, int status, const char *head,
                 const jv_http_header_t *hdrs, unsigned n)
{
  jv_http_req_box_t *box =
      jv__check_udata(L, req_index, JV_HTTP_REQUEST_MT, &req_mt);
  jv_http_conn_t *c = box->conn;

  if (c == NULL) {
    luaL_error(L, "request is over: its response was sent or its "
                  "connection closed");
    return NULL;
  }

  if (c->head_sent) {
    luaL_error(L, "response head already sent");
    return NULL;
  }

  if (status < 100 || status > 999) {
    luaL_error(L, "invalid status %d", status);
    return NULL;
  }

  relay_head_into(L, c, status, head, hdrs, n);
  return c;
}


/* The part of build_relay_head after its checks. L is NULL for a caller
 * outside Lua, which checks out_oom. */
static void
relay_head_into(lua_State *L, jv_http_conn_t *c, int status, const char *head,
                const jv_http_header_t *hdrs, unsigned n)
{
  int has_length = 0, has_date = 0;
  int bodyless = (status < 200 || status == 204 || status == 304);
  int connection = has_connection(head, hdrs, n);
  unsigned i;

  c->out_len = 0;
  out_add(L, c, "HTTP/1.1 ", 9);
  out_uint(L, c, (uint64_t) status);
  out_add(L, c, " ", 1);
  out_str(L, c, jv__http_reason(status));
  out_add(L, c, "\r\n", 2);

  /* Transfer-Encoding and Connection are hop-by-hop, so only the framing
   * and connection handling below add them. */
  for (i = 0; i < n; i++) {
    const char *name = head + hdrs[i].name_off;
    size_t len = hdrs[i].name_len;

    if (!is_end_to_end(head, hdrs, n, i, connection)) {
      continue;
    }

    if (name_is(name, len, "content-length")) {
      has_length = 1;

    } else if (name_is(name, len, "date")) {
      has_date = 1;
    }

    out_add(L, c, name, len);
    out_add(L, c, ": ", 2);
    out_add(L, c, head + hdrs[i].value_off, hdrs[i].value_len);
    out_add(L, c, "\r\n", 2);
  }

  /* From here on the same rules as write_head with an unknown length. */
  if (!has_date) {
    out_add(L, c, "Date: ", 6);
    out_str(L, c, jv__http_date());
    out_add(L, c, "\r\n", 2);
  }

  c->chunked = 0;
  if (!bodyless && !has_length) {
    if (c->parser.http_major == 1 && c->parser.http_minor >= 1) {
      out_str(L, c, "Transfer-Encoding: chunked\r\n");
      c->chunked = 1;

    } else {
      c->keep_alive = 0;
    }
  }

  if (c->server->draining) {
    c->keep_alive = 0;
  }

  if (status != 101) {
    if (!c->keep_alive) {
      out_str(L, c, "Connection: close\r\n");

    } else if (c->parser.http_major == 1 && c->parser.http_minor == 0) {
      out_str(L, c, "Connection: keep-alive\r\n");
    }
  }

  out_add(L, c, "\r\n", 2);
}


int
jv__http_relay_head(lua_State *L, int req_index, int status, const char *head,
                    const jv_http_header_t *hdrs, unsigned n)
{
  jv_http_conn_t *c = build_relay_head(L, req_index, status, head, hdrs, n);
  uv_buf_t buf;
  int rc;

  buf = uv_buf_init(c->out, (unsigned) c->out_len);
  c->status = status;
  c->head_sent = 1;
  rc = conn_write(c, &buf, 1);
  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  if (status == 101) {
    c->upgrade = 1;
  }

  lua_pushboolean(L, 1);
  return 1;
}


int
jv__http_relay_response(lua_State *L, int req_index, int status,
                        const char *head, const jv_http_header_t *hdrs,
                        unsigned n, const uv_buf_t *body, unsigned nbody,
                        int complete)
{
  jv_http_conn_t *c;
  uv_buf_t bufs[JV_HTTP_RELAY_MAX_PIECES + 4];
  char size_line[24];
  size_t total = 0;
  unsigned nbufs = 0, i;
  int rc;

  if (status < 200 || nbody > JV_HTTP_RELAY_MAX_PIECES) {
    return luaL_error(L, "relay of status %d with %u body pieces", status,
                      nbody);
  }

  c = build_relay_head(L, req_index, status, head, hdrs, n);
  bufs[nbufs++] = uv_buf_init(c->out, (unsigned) c->out_len);

  if (!c->is_head) {
    for (i = 0; i < nbody; i++) {
      total += body[i].len;
    }

    if (total > 0 && c->chunked) {
      int len = snprintf(size_line, sizeof(size_line), "%zx\r\n", total);

      bufs[nbufs++] = uv_buf_init(size_line, (unsigned) len);
    }

    for (i = 0; i < nbody; i++) {
      if (body[i].len > 0) {
        bufs[nbufs++] = body[i];
      }
    }

    if (total > 0 && c->chunked) {
      bufs[nbufs++] = uv_buf_init("\r\n", 2);
    }

    if (complete && c->chunked) {
      bufs[nbufs++] = uv_buf_init("0\r\n\r\n", 5);
    }
  }

  c->status = status;
  c->head_sent = 1;
  rc = conn_write(c, bufs, nbufs);

  if (complete) {
    conn_response_done(c);
  }

  if (rc != 0) {
    return jv__push_error(L, rc);
  }

  lua_pushboolean(L, 1);
  lua_pushstring(L, complete ? "done" : "more");
  return 2;
}


/* ---- for http_pass.c ---- */

int
jv__http_conn_write(jv_http_conn_t *c, const uv_buf_t *bufs, unsigned n)
{
  return conn_write(c, bufs, n);
}


void
jv__http_conn_done(jv_http_conn_t *c)
{
  conn_response_done(c);
}


void
jv__http_conn_close(jv_http_conn_t *c)
{
  conn_close(c);
}


void
jv__http_conn_timer_cb(uv_timer_t *t)
{
  conn_timer_cb(t);
}


jv_http_conn_t *
jv__http_check_req(lua_State *L)
{
  return check_req(L);
}


int
jv__http_pass_head(jv_http_conn_t *c, const char *target, size_t tlen,
                   int append_query, const char *const *skip,
                   const size_t *skip_len, unsigned nskip, const char *lines,
                   size_t lines_len, const char *host, int port)
{
  const char *url = c->head + c->url_off;
  const char *q = memchr(url, '?', c->url_len);
  int has_host = 0, connection = has_connection(c->head, c->hdrs, c->nhdrs);
  unsigned i, j;

  out_oom = 0;
  c->out_len = 0;
  out_str(NULL, c, llhttp_method_name(c->parser.method));
  out_add(NULL, c, " ", 1);
  out_add(NULL, c, target, tlen);
  if (q != NULL && append_query) {
    out_add(NULL, c, q, c->url_len - (size_t) (q - url));
  }
  out_add(NULL, c, " HTTP/1.1\r\n", 11);

  for (i = 0; i < c->nhdrs; i++) {
    const jv_http_header_t *h = &c->hdrs[i];
    const char *name = c->head + h->name_off;

    if (!is_end_to_end(c->head, c->hdrs, c->nhdrs, i, connection)) {
      continue;
    }
    for (j = 0; j < nskip; j++) {
      if (h->name_len == skip_len[j] &&
          strncasecmp(name, skip[j], h->name_len) == 0) {
        break;
      }
    }
    if (j < nskip) {
      continue;
    }
    if (name_is(name, h->name_len, "host")) {
      has_host = 1;
    }
    out_add(NULL, c, name, h->name_len);
    out_add(NULL, c, ": ", 2);
    out_add(NULL, c, c->head + h->value_off, h->value_len);
    out_add(NULL, c, "\r\n", 2);
  }

  out_add(NULL, c, lines, lines_len);
  for (i = 0; i < lines_len && !has_host;) {
    const char *nl = memchr(lines + i, '\n', lines_len - i);

    has_host = lines_len - i > 5 && strncasecmp(lines + i, "host:", 5) == 0;
    i = nl != NULL ? (unsigned) (nl - lines) + 1 : (unsigned) lines_len;
  }
  if (!has_host) {
    /* The fast path forwards only to IPv4 literals (http_pass.c). */
    out_str(NULL, c, "Host: ");
    out_str(NULL, c, host);
    if (port != 80) {
      out_add(NULL, c, ":", 1);
      out_uint(NULL, c, (uint64_t) port);
    }
    out_add(NULL, c, "\r\n", 2);
  }
  out_add(NULL, c, "\r\n", 2);

  return out_oom ? JV_ENOMEM : 0;
}


int
jv__http_pass_relay_head(jv_http_conn_t *c, int status, const char *head,
                         const jv_http_header_t *hdrs, unsigned n)
{
  out_oom = 0;
  relay_head_into(NULL, c, status, head, hdrs, n);
  return out_oom ? JV_ENOMEM : 0;
}


/* ---- server object ---- */

typedef struct {
  jv_http_server_t *srv;
} jv_http_server_box_t;


static jv_http_server_t *
check_server(lua_State *L)
{
  jv_http_server_box_t *box = luaL_checkudata(L, 1, JV_HTTP_SERVER_MT);

  if (box->srv == NULL) {
    luaL_error(L, "attempt to use a closed server");
  }

  return box->srv;
}


static double
opt_field_number(lua_State *L, int idx, const char *name, double def)
{
  double v;

  lua_getfield(L, idx, name);
  v = luaL_optnumber(L, -1, def);
  lua_pop(L, 1);

  if (v < 0) {
    luaL_error(L, "%s must be >= 0", name);
  }

  return v;
}


/* __index of requests and responses: methods from a table, other keys
 * from a C function of (object, key). */
const char jv__http_index_src[] = "local methods, field = ...\n"
                                  "return function(obj, key)\n"
                                  "  local m = methods[key]\n"
                                  "  if m ~= nil then\n"
                                  "    return m\n"
                                  "  end\n"
                                  "  return field(obj, key)\n"
                                  "end\n";
const size_t jv__http_index_src_len = sizeof(jv__http_index_src) - 1;


/* Wraps the handler so its result and errors come back to l_req_done. */
static const char wrapper_src[] =
    "local handler, traceback = ...\n"
    "local xpcall, pcall = xpcall, pcall\n"
    "return function(req)\n"
    "  local ok, err = pcall(req._done, req, xpcall(handler, traceback, req))\n"
    "  if not ok then\n"
    "    req:_done(false, err)\n"
    "  end\n"
    "end\n";


/* Body of the coroutines that run requests: after one request it waits in
 * next_request for another (of any server), so a busy server does not
 * create a coroutine per request. run is a server's wrapper from above. */
static const char worker_src[] = "local next_request = ...\n"
                                 "return function(run, req)\n"
                                 "  repeat\n"
                                 "    run(req)\n"
                                 "    run, req = nil, nil\n"
                                 "    run, req = next_request()\n"
                                 "  until run == nil\n"
                                 "end\n";


/* next_request(): parks the calling worker coroutine among the idle ones
 * until conn_dispatch resumes it with a wrapper and a request. Returns
 * nothing, so that the worker ends, when MAX_IDLE_WORKERS already wait. */
static int
l_next_request(lua_State *L)
{
  if (idle_workers.n >= MAX_IDLE_WORKERS || !jv__co_parkable(L)) {
    return 0;
  }

  idle_workers.refs[idle_workers.n++] = jv__co_park(L);
  return lua_yield(L, 0);
}


/* Creates the worker function once per process (and once per Lua state
 * that loads core.so under plain luajit). */
static void
init_worker(lua_State *L)
{
  if (luaL_loadbuffer(L, worker_src, sizeof(worker_src) - 1, "=http worker") !=
      0) {
    lua_error(L);
  }
  lua_pushcfunction(L, l_next_request);
  lua_call(L, 1, 1);
  worker_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  idle_workers.n = 0;
}


static void
push_wrapper(lua_State *L, int handler_index)
{
  luaL_loadbuffer(L, wrapper_src, sizeof(wrapper_src) - 1, "=http handler");
  lua_pushvalue(L, handler_index);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  lua_remove(L, -2);
  lua_call(L, 2, 1);
}


/*
 * core.http.listen{host=, port=, tls=, handler=fn, max_header_size=,
 * max_headers=, max_url=, max_body=, header_timeout=, idle_timeout=,
 * access_log=true}: starts a server; fn(req) runs in a new coroutine per
 * request and either returns status, headers, body or responds itself.
 */
static int
l_http_listen(lua_State *L)
{
  jv_http_server_box_t *box;
  jv_http_server_t *srv;
  jv_listener_t *l;
  const char *host;
  int port, backlog, tls_index = 0;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);

  lua_getfield(L, 1, "handler");
  luaL_argcheck(L, lua_isfunction(L, -1), 1, "handler must be a function");
  lua_getfield(L, 1, "host");
  host = luaL_optstring(L, -1, "127.0.0.1");
  lua_getfield(L, 1, "port");
  port = (int) luaL_checkinteger(L, -1);
  lua_getfield(L, 1, "backlog");
  backlog = (int) luaL_optinteger(L, -1, 511);
  lua_getfield(L, 1, "tls");
  if (!lua_isnil(L, -1)) {
    tls_index = lua_gettop(L);
  }

  srv = calloc(1, sizeof(*srv));
  if (srv == NULL) {
    return luaL_error(L, "out of memory");
  }

  srv->limits.max_header_size =
      (size_t) opt_field_number(L, 1, "max_header_size", 16384);
  srv->limits.max_headers =
      (unsigned) opt_field_number(L, 1, "max_headers", 100);
  srv->limits.max_url = (size_t) opt_field_number(L, 1, "max_url", 8192);
  srv->limits.max_body =
      (uint64_t) opt_field_number(L, 1, "max_body", 1024 * 1024);
  srv->limits.header_timeout = opt_field_number(L, 1, "header_timeout", 10);
  srv->limits.idle_timeout = opt_field_number(L, 1, "idle_timeout", 60);
  srv->limits.max_connections =
      (unsigned) opt_field_number(L, 1, "max_connections", 10000);
  lua_getfield(L, 1, "access_log");
  srv->access_log = lua_isnil(L, -1) ? 1 : lua_toboolean(L, -1);
  lua_pop(L, 1);
  srv->drain_ref = LUA_NOREF;

  l = jv__listener_push(L, host, port, backlog, tls_index);
  if (l == NULL) {
    free(srv);
    return 3;
  }

  srv->listener = l;
  l->data = srv;
  l->on_stream = on_stream;
  lua_pop(L, 1); /* the listener object: the server owns the listener */

  push_wrapper(L, 2);
  srv->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);

  box = lua_newuserdata(L, sizeof(*box));
  box->srv = srv;
  luaL_getmetatable(L, JV_HTTP_SERVER_MT);
  lua_setmetatable(L, -2);
  return 1;
}


static int
l_server_port(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);
  struct sockaddr_storage ss;
  int len = sizeof(ss);

  if (srv->listener == NULL) {
    return luaL_error(L, "server is no longer listening");
  }

  uv_tcp_getsockname(&srv->listener->tcp, (struct sockaddr *) &ss, &len);
  lua_pushinteger(L, ntohs(ss.ss_family == AF_INET6
                               ? ((struct sockaddr_in6 *) &ss)->sin6_port
                               : ((struct sockaddr_in *) &ss)->sin_port));
  return 1;
}


/* server:set_handler(fn): later requests run fn; requests in flight finish
 * on the handler they started with. */
static int
l_server_set_handler(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);

  luaL_checktype(L, 2, LUA_TFUNCTION);
  push_wrapper(L, 2);
  luaL_unref(L, LUA_REGISTRYINDEX, srv->handler_ref);
  srv->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}


static void
server_stop_listening(jv_http_server_t *srv)
{
  if (srv->listener != NULL) {
    jv__listener_close(srv->listener);
    srv->listener = NULL;
  }
}


/* server:close(): stops accepting; open connections carry on. */
static int
l_server_close(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);

  server_stop_listening(srv);
  return 0;
}


static void
drain_timeout_cb(uv_timer_t *t)
{
  jv_http_server_t *srv = t->data;
  jv_http_conn_t *c, *next;

  srv->drain_timed_out = 1;
  jv_log(JV_LOG_WARN, "drain timed out; closing open connections", NULL);

  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    conn_close(c);
  }

  server_maybe_drained(srv);
}


/*
 * server:drain([timeout]): stops accepting, closes idle keep-alive
 * connections, lets requests in flight finish with Connection: close, and
 * returns true once none remain, or false when timeout seconds (default
 * 30) passed first and the rest were closed.
 */
static int
l_server_drain(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);
  double timeout = luaL_optnumber(L, 2, 30);
  jv_http_conn_t *c, *next;

  if (srv->drain_ref != LUA_NOREF) {
    return luaL_error(L, "server is already draining");
  }

  srv->draining = 1;
  srv->drain_timed_out = 0;
  server_stop_listening(srv);

  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    if (c->state == CONN_HEAD) {
      conn_close(c);
    }
  }

  if (srv->nconns == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }

  srv->drain_timer = malloc(sizeof(*srv->drain_timer));
  if (srv->drain_timer == NULL) {
    return luaL_error(L, "out of memory");
  }

  uv_timer_init(jv__loop(), srv->drain_timer);
  srv->drain_timer->data = srv;
  uv_timer_start(srv->drain_timer, drain_timeout_cb,
                 (uint64_t) (timeout * 1000), 0);

  srv->drain_ref = jv__co_park(L);
  return lua_yield(L, 0);
}


/* server:close_all(): closes every connection now (after a drain timed
 * out). Returns how many were closed. */
static int
l_server_close_all(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);
  jv_http_conn_t *c, *next;
  int n = 0;

  for (c = srv->conns; c != NULL; c = next) {
    next = c->next;
    conn_close(c);
    n++;
  }

  lua_pushinteger(L, n);
  return 1;
}


static int
l_server_connections(lua_State *L)
{
  jv_http_server_t *srv = check_server(L);

  lua_pushinteger(L, srv->nconns);
  lua_pushinteger(L, srv->nbusy);
  lua_pushnumber(L, (lua_Number) srv->refused);
  return 3;
}


int
jv__open_http(lua_State *L)
{
  static const luaL_Reg funcs[] = { { "listen", l_http_listen },
                                    { NULL, NULL } };
  static const luaL_Reg server_methods[] = {
    { "port", l_server_port },
    { "set_handler", l_server_set_handler },
    { "close", l_server_close },
    { "drain", l_server_drain },
    { "close_all", l_server_close_all },
    { "connections", l_server_connections },
    { NULL, NULL }
  };
  static const luaL_Reg req_methods[] = {
    { "header", l_req_header },
    { "headers", l_req_headers },
    { "header_list", l_req_header_list },
    { "header_count", l_req_header_count },
    { "has_header_prefix", l_req_has_header_prefix },
    { "header_values", l_req_header_values },
    { "peer", l_req_peer },
    { "read", l_req_read },
    { "respond", l_req_respond },
    { "send_head", l_req_send_head },
    { "write", l_req_write },
    { "finish", l_req_finish },
    { "hijack", l_req_hijack },
    { "keepalive", l_req_keepalive },
    { "abort", l_req_abort },
    { "peer_closed", l_req_peer_closed },
    { "is_upgrade", l_req_is_upgrade },
    { "head_sent", l_req_head_sent },
    { "forward_head", l_req_forward_head },
    { "_done", l_req_done },
    { NULL, NULL }
  };
  unsigned char rnd[4];
  int i;

  init_worker(L);

  llhttp_settings_init(&parser_settings);
  parser_settings.on_message_begin = on_message_begin;
  parser_settings.on_url = on_url;
  parser_settings.on_header_field = on_header_field;
  parser_settings.on_header_value = on_header_value;
  parser_settings.on_headers_complete = on_headers_complete;
  parser_settings.on_body = on_body;
  parser_settings.on_message_complete = on_message_complete;
  parser_settings.on_chunk_extension_name = on_chunk_extension;
  parser_settings.on_chunk_extension_value = on_chunk_extension;
  parser_settings.on_chunk_complete = on_chunk_header;

  uv_random(NULL, NULL, rnd, sizeof(rnd), 0, NULL);
  for (i = 0; i < 4; i++) {
    snprintf(id_prefix + i * 2, 3, "%02x", rnd[i]);
  }

  luaL_newmetatable(L, JV_HTTP_SERVER_MT);
  lua_newtable(L);
  luaL_setfuncs(L, server_methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);

  /* Methods are found in a Lua table by a Lua __index, and only the
   * request's fields (method, target, ...) cost a call into C. */
  lua_newtable(L);
  luaL_setfuncs(L, req_methods, 0);
  jv__pass_register(L, lua_gettop(L), 1);
  luaL_newmetatable(L, JV_HTTP_REQUEST_MT);
  if (luaL_loadbuffer(L, jv__http_index_src, jv__http_index_src_len,
                      "=http request") != 0) {
    lua_error(L);
  }
  lua_pushvalue(L, -3);
  lua_pushcfunction(L, l_req_index);
  lua_call(L, 2, 1);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 2);

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  jv__http_client_register(L, lua_gettop(L));
  jv__http_names_register(L, lua_gettop(L));
  jv__pass_register(L, lua_gettop(L), 0);
  return 1;
}
