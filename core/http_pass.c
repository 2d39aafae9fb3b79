/*
 * http_pass.c: the proxy's fast path, for GET and HEAD requests without a
 * body whose forwarding decision Lua has already made.
 *
 * conn_dispatch (http.c) calls jv__pass_try before it starts a Lua
 * coroutine. A request takes the fast path when one of the decisions
 * that Lua recorded covers it:
 *   req:pass_learn         the daemon: a route keyed by the path and one
 *                          "vary" header, on a connection Lua admitted;
 *   req:pass_learn_target  the broker: the edge signature's checks, which
 *                          broker_try repeats here, and its allowed
 *                          targets;
 *   req:pass_learn_edge    the edge: an allow decision keyed by method,
 *                          target, Host, Origin and Authorization, which
 *                          edge_try signs for a broker.
 * req:pass hands over a request that the Lua handler has just decided.
 *
 * The exchange then does what proxy.forward does: it takes a pooled
 * upstream connection or opens one, sends the head, relays the response
 * head and body with the same framing rules, and pools the connection.
 *
 * Lua stays the only place that decides. A request that no decision
 * covers goes to the Lua handler, as does one whose exchange failed
 * before any response byte went to the client. In that second case
 * req:pass_failure returns to the handler what failed, so that proxy.forward
 * reports it as it would have (a refused connect, a reset, a timeout)
 * without sending the request again. core.http.pass_reset, called on
 * every reload, drops every decision and every admission.
 */
#include "http_server.h"

#include <arpa/inet.h>
#include <math.h>
#include <ctype.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define PASS_BUCKETS       256
#define PASS_MAX_ROUTES    1024 /* per server; the table is emptied at this */
#define PASS_MAX_KEY       2048
#define PASS_MAX_SKIP      8
#define PASS_MAX_UPSTREAMS 256
#define PASS_POOL_MAX      32 /* idle connections per upstream */
#define PASS_SHUN_MS       30000
#define PASS_SWEEP_MS      5000
#define PASS_MAX_HEAD      (64 * 1024)
#define PASS_MAX_HEADERS   100
/* Header fields accepted from another justavps hop (proxy.lua's
 * HOP_MAX_HEADERS): room for the Date field a hop may add. */
#define PASS_HOP_MAX_HEADERS 128
#define PASS_MAX_INTERIM     16
#define PASS_MAX_PIECES      16
/* NOTE: a broker that dials more targets than this sends the rest
 * through Lua on every request; 4096 is a guess at a large fleet. */
#define PASS_MAX_TARGETS         4096 /* allowed broker targets per server */
#define PASS_BROKER_POOL_IDLE_MS 30000

/* An upstream address and its idle connections. There are at most
 * PASS_MAX_UPSTREAMS records; one that no route and no exchange points at
 * is reused for another address when that bound is reached. */
typedef struct jv_upstream_s jv_upstream_t;

struct jv_upstream_s {
  jv_upstream_t *next;
  struct sockaddr_in addr;
  char host[INET_ADDRSTRLEN];
  int port;
  struct ssl_ctx_st *tls; /* client context, or NULL for plain TCP */
  int tls_ref;            /* keeps the Lua TLS context alive */
  char server_name[256];  /* SNI and the name checked, or "" */
  jv_stream_t *idle[PASS_POOL_MAX];
  uint64_t idle_at[PASS_POOL_MAX];
  unsigned nidle;
  unsigned refs;       /* routes and exchanges that point here */
  uint64_t idle_ms;    /* pool_idle of the latest decision */
  uint64_t shun_until; /* time before which nothing is pooled */
};

/* One cached decision, allocated with its strings in one block. */
typedef struct jv_route_s jv_route_t;

struct jv_route_s {
  jv_route_t *next;
  uint32_t hash;
  jv_upstream_t *up;
  uint64_t timeout_ms;
  int stale_408;
  const char *key;
  size_t key_len;
  const char *target;
  size_t target_len;
  const char *lines;
  size_t lines_len;
  unsigned nskip;
  const char *skip[PASS_MAX_SKIP];
  size_t skip_len[PASS_MAX_SKIP];
};

/* The broker's checks of the edge signature (see broker_try), as
 * req:pass_learn_target set them for the table's generation, and the
 * targets that its policy allowed, as IPv4 address << 16 | port. */
typedef struct {
  int enabled;
  char *secret;
  size_t secret_len;
  char broker_id[65];
  size_t broker_id_len;
  double clock_skew;
  void *nonces;
  int nonces_ref;
  char proto[16];
  uint64_t timeout_ms;
  const jv_http_names_t *drop;
  int drop_ref;
  uint64_t *targets;
  unsigned ntargets;
  unsigned targets_cap;
} jv_pass_broker_t;

/* The edge's decision for one request key (see edge_key), allocated
 * with its strings in one block: the request goes to broker up, signed
 * with secret, until expires. */
typedef struct jv_edge_entry_s jv_edge_entry_t;

struct jv_edge_entry_s {
  jv_edge_entry_t *next;
  uint32_t hash;
  uint64_t expires;
  jv_upstream_t *up;
  uint64_t timeout_ms;
  int drop_ref; /* the core.http.header_names list of dropped fields */
  const jv_http_names_t *drop;
  const char *key;
  size_t key_len;
  const char *host;   /* as signed and sent: the machine's host name */
  const char *prefix; /* put before the request-target, or "" */
  const char *target_ip;
  const char *target_port;
  const char *slug;
  const char *broker_id;
  const char *secret;
  size_t host_len, prefix_len, target_ip_len, target_port_len, slug_len,
      broker_id_len, secret_len;
};

struct jv_pass_table_s {
  jv_route_t *buckets[PASS_BUCKETS];
  jv_edge_entry_t *edge[PASS_BUCKETS];
  unsigned edge_count;
  unsigned count;
  uint64_t generation;
  char vary[64]; /* header name in the key, "" for none */
  size_t vary_len;
  jv_pass_broker_t broker;
};

typedef struct {
  uv_connect_t req;
  jv_pass_t *p; /* NULL once the exchange gave up on this connect */
} jv_pass_connect_t;

/* The exchange of one request, reused for each request of a connection. */
struct jv_pass_s {
  jv_http_conn_t *conn;
  jv_upstream_t *up;
  uint64_t timeout_ms; /* from the route, which a reset may free */
  int stale_408;
  jv_stream_t *s;
  jv_pass_connect_t *connecting;
  int reused;
  uint64_t last_ms;        /* the last progress of the exchange */
  int relaying;            /* the response head went to the client */
  int in_lua_call;         /* req:pass is starting this exchange */
  unsigned max_headers;    /* header fields accepted in the response */
  int stale;               /* the response was an app's idle-close 408 */
  const char *fail_reason; /* why the response was malformed, or NULL */
  char failed_host[INET_ADDRSTRLEN]; /* upstream of the last failure */
  int failed_port;
  int sync_failed; /* it failed before req:pass returned */
  int drain_wait;  /* reading stopped until the client drains */

  /* The response. */
  llhttp_t parser;
  jv_http_head_t h;
  unsigned crlf_run;
  char prev_byte;
  int head_scanned;
  unsigned ninterim;
  int interim;
  int interim_ended;
  int headers_done;
  int message_done;
  int extra_bytes; /* bytes followed the response */
  int cb_error;

  /* Body pieces of the current read, written when it is parsed. */
  uv_buf_t pieces[PASS_MAX_PIECES];
  unsigned npieces;
};

static llhttp_settings_t settings;
static uint64_t generation = 1;
static jv_upstream_t *upstreams;
static unsigned nupstreams;
static unsigned npooled;
static unsigned nexchanges; /* exchanges in flight */
static uv_timer_t sweep_timer;
static int sweep_timer_init;
static struct {
  uint64_t passed;   /* requests forwarded here */
  uint64_t fallback; /* exchanges that failed before the response */
} stats;

static void pass_send(jv_pass_t *p);
static void pool_close_all(jv_upstream_t *up);
static int relay(jv_pass_t *p);
static int response_closes(jv_pass_t *p);


/* ---- upstreams and their pools ---- */

/* Returns the record of host:port, with the TLS client context at
 * tls_index (0 for none) and server_name (NULL for none), made on first
 * use. Returns NULL when host is no IPv4 literal, the name is too long,
 * or PASS_MAX_UPSTREAMS records exist. */
static jv_upstream_t *
upstream_get(lua_State *L, const char *host, int port, int tls_index,
             const char *server_name)
{
  struct ssl_ctx_st *tls =
      tls_index != 0 ? jv__tls_check(L, tls_index, 0) : NULL;
  const char *name = server_name != NULL ? server_name : "";
  jv_upstream_t *up;
  struct sockaddr_in addr;

  if (uv_ip4_addr(host, port, &addr) != 0 ||
      strlen(name) >= sizeof(up->server_name)) {
    return NULL;
  }

  for (up = upstreams; up != NULL; up = up->next) {
    if (up->port == port && up->addr.sin_addr.s_addr == addr.sin_addr.s_addr &&
        up->tls == tls && strcmp(up->server_name, name) == 0) {
      return up;
    }
  }

  if (nupstreams >= PASS_MAX_UPSTREAMS) {
    /* Reuses a record that nothing points at for the new address. */
    for (up = upstreams; up != NULL && up->refs > 0; up = up->next) {
    }
    if (up == NULL) {
      return NULL;
    }
    pool_close_all(up);
    if (up->tls_ref != LUA_NOREF) {
      luaL_unref(jv__lua(), LUA_REGISTRYINDEX, up->tls_ref);
    }
    up->shun_until = 0;

  } else {
    up = calloc(1, sizeof(*up));
    if (up == NULL) {
      return NULL;
    }
    up->next = upstreams;
    upstreams = up;
    nupstreams++;
  }

  up->tls = tls;
  up->tls_ref = LUA_NOREF;
  if (tls != NULL) {
    lua_pushvalue(L, tls_index);
    up->tls_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  strcpy(up->server_name, name);
  up->addr = addr;
  up->port = port;
  uv_ip4_name(&addr, up->host, sizeof(up->host));
  return up;
}


static void
pool_close_all(jv_upstream_t *up)
{
  while (up->nidle > 0) {
    jv_stream_close(up->idle[--up->nidle], NULL);
    npooled--;
  }
}


/* Closes the idle connections of up that are older than its pool_idle. */
static void
pool_expire(jv_upstream_t *up, uint64_t now)
{
  unsigned i, kept = 0;

  for (i = 0; i < up->nidle; i++) {
    if (now - up->idle_at[i] < up->idle_ms) {
      up->idle[kept] = up->idle[i];
      up->idle_at[kept] = up->idle_at[i];
      kept++;

    } else {
      jv_stream_close(up->idle[i], NULL);
      npooled--;
    }
  }

  up->nidle = kept;
}


static void
sweep_cb(uv_timer_t *t)
{
  uint64_t now = uv_now(jv__loop());
  jv_upstream_t *up;

  for (up = upstreams; up != NULL; up = up->next) {
    pool_expire(up, now);
  }

  if (npooled == 0) {
    uv_timer_stop(t);
  }
}


/* Reads on an idle pooled connection: bytes, an end or an error all mean
 * that it cannot carry a request, so it leaves the pool and closes. */
static void
idle_read_cb(jv_stream_t *s, ssize_t nread, const char *data)
{
  jv_upstream_t *up = s->data;
  unsigned i;

  (void) nread;
  (void) data;
  for (i = 0; i < up->nidle; i++) {
    if (up->idle[i] == s) {
      up->nidle--;
      npooled--;
      memmove(&up->idle[i], &up->idle[i + 1],
              (up->nidle - i) * sizeof(up->idle[0]));
      memmove(&up->idle_at[i], &up->idle_at[i + 1],
              (up->nidle - i) * sizeof(up->idle_at[0]));
      break;
    }
  }

  jv_stream_close(s, NULL);
}


/* Pools s, which stays registered for reading: a read callback swap
 * costs no system call, while stopping and restarting the read costs two
 * epoll_ctl calls per request. */
static void
pool_put(jv_upstream_t *up, jv_stream_t *s)
{
  uint64_t now = uv_now(jv__loop());

  if (up->nidle >= PASS_POOL_MAX || up->shun_until > now ||
      jv_stream_read_start(s, idle_read_cb) != 0) {
    jv_stream_close(s, NULL);
    return;
  }
  s->data = up;

  up->idle[up->nidle] = s;
  up->idle_at[up->nidle] = now;
  up->nidle++;
  npooled++;

  if (!sweep_timer_init) {
    uv_timer_init(jv__loop(), &sweep_timer);
    uv_unref((uv_handle_t *) &sweep_timer);
    sweep_timer_init = 1;
  }
  if (!uv_is_active((uv_handle_t *) &sweep_timer)) {
    uv_timer_start(&sweep_timer, sweep_cb, PASS_SWEEP_MS, PASS_SWEEP_MS);
  }
}


/* Returns the newest idle connection that is young enough, or NULL. A
 * GET or HEAD without a body is sent again on a new connection when a
 * pooled one fails, so no system call checks it first. */
static jv_stream_t *
pool_take(jv_upstream_t *up)
{
  pool_expire(up, uv_now(jv__loop()));
  if (up->nidle == 0) {
    return NULL;
  }

  npooled--;
  return up->idle[--up->nidle];
}


/* ---- decisions ---- */

static uint32_t
hash_bytes(const char *s, size_t len)
{
  uint32_t h = 2166136261u;
  size_t i;

  for (i = 0; i < len; i++) {
    h = (h ^ (unsigned char) s[i]) * 16777619u;
  }

  return h;
}


static void
edge_free(jv_edge_entry_t *e)
{
  e->up->refs--;
  luaL_unref(jv__lua(), LUA_REGISTRYINDEX, e->drop_ref);
  /* The key contains the client's Authorization value. */
  OPENSSL_cleanse((void *) e->key, e->key_len);
  OPENSSL_cleanse((void *) e->secret, e->secret_len);
  free(e);
}


static void
edge_clear(jv_pass_table_t *t)
{
  unsigned i;

  for (i = 0; i < PASS_BUCKETS; i++) {
    jv_edge_entry_t *e = t->edge[i], *next;

    for (; e != NULL; e = next) {
      next = e->next;
      edge_free(e);
    }
    t->edge[i] = NULL;
  }

  t->edge_count = 0;
}


static void
table_clear(jv_pass_table_t *t)
{
  unsigned i;

  for (i = 0; i < PASS_BUCKETS; i++) {
    jv_route_t *r = t->buckets[i], *next;

    for (; r != NULL; r = next) {
      next = r->next;
      r->up->refs--;
      free(r);
    }
    t->buckets[i] = NULL;
  }

  t->count = 0;
  edge_clear(t);
}


/* Makes the table current: a reset since its last use empties it. An
 * exchange keeps no pointer to its route, so this is safe at any time. */
static void
table_current(jv_pass_table_t *t)
{
  jv_pass_broker_t *b = &t->broker;
  lua_State *L;

  if (t->generation == generation) {
    return;
  }

  table_clear(t);
  t->generation = generation;
  if (b->enabled) {
    L = jv__lua();
    luaL_unref(L, LUA_REGISTRYINDEX, b->nonces_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, b->drop_ref);
    if (b->secret != NULL) {
      OPENSSL_cleanse(b->secret, b->secret_len);
    }
    free(b->secret);
    free(b->targets);
    memset(b, 0, sizeof(*b));
  }
}


/* Writes the key of c's request into buf: the path, then NUL and the
 * value of the vary header, or 0x01 when the request has none. Returns
 * its length, or 0 when it does not fit. */
static size_t
request_key(jv_http_conn_t *c, const jv_pass_table_t *t, char *buf)
{
  const char *url = c->head + c->url_off;
  const char *q = memchr(url, '?', c->url_len);
  size_t plen = q != NULL ? (size_t) (q - url) : c->url_len;
  const char *v = NULL;
  size_t vlen = 0;

  if (t->vary_len > 0) {
    v = jv__http_find_header(c->head, c->hdrs, c->nhdrs, t->vary, &vlen);
  }

  if (plen + 1 + vlen > PASS_MAX_KEY) {
    return 0;
  }

  memcpy(buf, url, plen);
  if (v == NULL) {
    buf[plen] = '\1';
    return plen + 1;
  }

  buf[plen] = '\0';
  memcpy(buf + plen + 1, v, vlen);
  return plen + 1 + vlen;
}


static const jv_route_t *
route_find(jv_pass_table_t *t, const char *key, size_t len)
{
  uint32_t h = hash_bytes(key, len);
  const jv_route_t *r;

  for (r = t->buckets[h % PASS_BUCKETS]; r != NULL; r = r->next) {
    if (r->hash == h && r->key_len == len && memcmp(r->key, key, len) == 0) {
      return r;
    }
  }

  return NULL;
}


/* ---- response parsing ---- */

static jv_pass_t *
parser_pass(llhttp_t *p)
{
  return p->data;
}


static int
on_message_begin(llhttp_t *parser)
{
  jv_pass_t *p = parser_pass(parser);

  p->h.head_len = 0;
  p->h.nhdrs = 0;
  p->h.last_was_value = 0;
  p->interim = 0;
  return 0;
}


/* Stores the head's fields. An error stops the parser with cb_error. */
static int
on_header_field(llhttp_t *parser, const char *at, size_t len)
{
  jv_pass_t *p = parser_pass(parser);

  if (p->headers_done) {
    return 0; /* a trailer field: dropped, as the Lua client does */
  }

  p->cb_error =
      jv__http_head_field(&p->h, at, len, PASS_MAX_HEAD, p->max_headers);
  return p->cb_error != 0 ? -1 : 0;
}


static int
on_header_value(llhttp_t *parser, const char *at, size_t len)
{
  jv_pass_t *p = parser_pass(parser);

  if (p->headers_done) {
    return 0;
  }

  p->cb_error = jv__http_head_value(&p->h, at, len, PASS_MAX_HEAD);
  return p->cb_error != 0 ? -1 : 0;
}


/* As in http_client.c: 1xx responses are skipped, and the response to a
 * HEAD, a 204 or a 304 has no body whatever its Content-Length. */
static int
on_headers_complete(llhttp_t *parser)
{
  jv_pass_t *p = parser_pass(parser);
  int status = parser->status_code;

  if (status < 200 && status != 101) {
    if (++p->ninterim > PASS_MAX_INTERIM) {
      p->cb_error = JV_EPROTOCOL;
      return -1;
    }
    p->interim = 1;
    return 0;
  }

  if (status == 101) {
    /* Nothing asked for an upgrade. */
    p->cb_error = JV_EPROTOCOL;
    return -1;
  }

  if (p->reused && p->stale_408 && status == 408 && response_closes(p)) {
    /* An app's notice that it closed the idle connection, not the
     * response to this request (see stale_408 in proxy.lua). failed()
     * sends the request again on a new connection. */
    p->cb_error = JV_ECLOSED;
    p->stale = 1;
    return -1;
  }

  p->headers_done = 1;
  if (p->conn->is_head || status == 204 || status == 304) {
    return 1;
  }

  return 0;
}


static int
on_body(llhttp_t *parser, const char *at, size_t len)
{
  jv_pass_t *p = parser_pass(parser);

  if (p->npieces > 0) {
    uv_buf_t *last = &p->pieces[p->npieces - 1];

    if (last->base + last->len == at) {
      last->len += len;
      return 0;
    }
  }

  if (p->npieces == PASS_MAX_PIECES) {
    /* Many small chunks in one read: the pieces so far go out now, while
     * the read buffer they point into is still valid. */
    int rc = relay(p);

    if (rc != 0) {
      p->cb_error = rc;
      return -1;
    }
  }

  p->pieces[p->npieces++] = uv_buf_init((char *) at, (unsigned) len);
  return 0;
}


static int
on_message_complete(llhttp_t *parser)
{
  jv_pass_t *p = parser_pass(parser);

  if (p->interim) {
    p->interim_ended = 1;
  } else {
    p->message_done = 1;
  }

  return HPE_PAUSED;
}


static void
response_reset(jv_pass_t *p)
{
  llhttp_init(&p->parser, HTTP_RESPONSE, &settings);
  p->parser.data = p;
  p->h.head_len = 0;
  p->h.nhdrs = 0;
  p->h.last_was_value = 0;
  p->crlf_run = 0;
  p->prev_byte = 0;
  p->head_scanned = 0;
  p->ninterim = 0;
  p->interim = 0;
  p->interim_ended = 0;
  p->headers_done = 0;
  p->message_done = 0;
  p->extra_bytes = 0;
  p->cb_error = 0;
  p->stale = 0;
  p->fail_reason = NULL;
  p->npieces = 0;
}


/* Parses data. Returns 0, or an error code for a malformed response. */
static int
parse(jv_pass_t *p, const char *data, size_t len)
{
  while (len > 0) {
    llhttp_errno_t err;
    size_t used;

    if (!p->head_scanned &&
        jv__http_scan_head(&p->prev_byte, &p->crlf_run, &p->head_scanned, data,
                           len) != 0) {
      p->fail_reason = "bare LF or folded line in response head";
      return JV_EPROTOCOL;
    }

    err = llhttp_execute(&p->parser, data, len);
    if (err == HPE_OK) {
      return 0;
    }

    if (err != HPE_PAUSED) {
      if (p->cb_error != 0) {
        return p->cb_error;
      }
      p->fail_reason = llhttp_get_error_reason(&p->parser);
      return JV_EPROTOCOL;
    }

    used = (size_t) (llhttp_get_error_pos(&p->parser) - data);
    data += used;
    len -= used;

    if (p->message_done) {
      p->extra_bytes = len > 0;
      return 0;
    }

    /* A 1xx response ended, and the next head starts here. */
    p->interim_ended = 0;
    p->h.head_len = 0;
    p->h.nhdrs = 0;
    p->crlf_run = 0;
    p->prev_byte = 0;
    p->head_scanned = 0;
    llhttp_resume(&p->parser);
  }

  return 0;
}


/* Returns non-zero when the response head announces that the upstream
 * closes the connection after it. */
static int
response_closes(jv_pass_t *p)
{
  size_t len;
  const char *v = jv__http_find_header(p->h.head, p->h.hdrs, p->h.nhdrs,
                                       "connection", &len);

  if (v != NULL) {
    return jv__http_list_has_token(v, len, "close", 5);
  }

  return p->parser.http_major == 1 && p->parser.http_minor == 0;
}


/* ---- the exchange ---- */

static void
exchange_end(jv_pass_t *p)
{
  jv_http_conn_t *c = p->conn;

  c->passing = 0;
  nexchanges--;
  p->up->refs--;
  uv_timer_stop(&c->timer);

  /* A large response head leaves its buffers to the next exchange of the
   * connection only when they are small. */
  if (p->h.head_cap > 8192) {
    free(p->h.head);
    p->h.head = NULL;
    p->h.head_cap = 0;
  }
  if (p->h.hdr_cap > 64) {
    free(p->h.hdrs);
    p->h.hdrs = NULL;
    p->h.hdr_cap = 0;
  }
}


/* Hands the request to the Lua handler after its exchange failed before
 * any response byte went to the client. req:pass_failure returns code. */
static void
fail_to_lua(jv_pass_t *p, int code, int connected)
{
  jv_http_conn_t *c = p->conn;

  if (p->s != NULL) {
    jv_stream_close(p->s, NULL);
    p->s = NULL;
  }

  if (p->in_lua_call) {
    /* Nothing was sent: req:pass returns false and the handler goes on. */
    p->sync_failed = code;
    exchange_end(p);
    return;
  }

  c->pass_failed = code;
  c->pass_connected = connected;
  /* Copied because the record may serve another address by the time the
   * handler calls req:pass_failure. */
  memcpy(p->failed_host, p->up->host, sizeof(p->failed_host));
  p->failed_port = p->up->port;
  stats.fallback++;
  exchange_end(p);
  jv__http_conn_to_lua(c);
}


/* Closes the client's connection after the exchange failed past the
 * response head, because no other signal is left. */
static void
cut(jv_pass_t *p)
{
  jv_http_conn_t *c = p->conn;

  if (p->s != NULL) {
    jv_stream_close(p->s, NULL);
    p->s = NULL;
  }

  exchange_end(p);
  c->keep_alive = 0;
  jv__http_conn_done(c);
}


/* Returns non-zero for the codes of a connection that nothing accepted or
 * that the upstream closed or reset, as proxy.lua's UNREACHABLE lists. */
static int
unreachable(int code)
{
  return code == UV_ECONNREFUSED || code == UV_ECONNRESET ||
         code == UV_ENETUNREACH || code == UV_EHOSTUNREACH ||
         code == UV_EPIPE || code == UV_EOF || code == JV_ECLOSED;
}


/* Handles a failure with code of the exchange's connection. A pooled
 * connection that failed before its response is replaced by a new one
 * once, as proxy.forward does, and its upstream then gets only new
 * connections for PASS_SHUN_MS. A request that timed out is not sent
 * again. */
static void
failed(jv_pass_t *p, int code)
{
  if (p->relaying) {
    cut(p);
    return;
  }

  if (p->reused && code != JV_ETIMEOUT) {
    jv_upstream_t *up = p->up;
    uint64_t now = uv_now(jv__loop());

    jv_stream_close(p->s, NULL);
    p->s = NULL;
    p->reused = 0;
    if (p->stale || !unreachable(code)) {
      /* As in proxy.forward: sent again, but the upstream keeps its
       * pool, because a stale 408 or a malformed response shows nothing
       * about its other connections. */
      p->stale = 0;
      pass_send(p);
      return;
    }
    if (up->shun_until <= now) {
      char port[8], seconds[8];

      snprintf(port, sizeof(port), "%d", up->port);
      snprintf(seconds, sizeof(seconds), "%d", PASS_SHUN_MS / 1000);
      jv_log(JV_LOG_INFO,
             "a reused upstream connection failed; new connections only "
             "for a while",
             "host", up->host, "port", port, "code", jv_err_name(code),
             "seconds", seconds, NULL);
    }
    up->shun_until = now + PASS_SHUN_MS;
    pool_close_all(up);
    pass_send(p);
    return;
  }

  fail_to_lua(p, code, 1);
}


/* Writes the response head (the first time) and the body pieces of this
 * read in one write, with the last chunk when the message is done. */
static int
relay(jv_pass_t *p)
{
  jv_http_conn_t *c = p->conn;
  uv_buf_t bufs[PASS_MAX_PIECES + 4];
  char size_line[24];
  size_t total = 0;
  unsigned n = 0, i;
  int rc;

  if (!p->relaying) {
    rc = jv__http_pass_relay_head(c, (int) p->parser.status_code, p->h.head,
                                  p->h.hdrs, p->h.nhdrs);
    if (rc != 0) {
      return rc;
    }
    bufs[n++] = uv_buf_init(c->out, (unsigned) c->out_len);
    c->status = (int) p->parser.status_code;
    c->head_sent = 1;
    p->relaying = 1;
  }

  for (i = 0; i < p->npieces; i++) {
    total += p->pieces[i].len;
  }

  if (total > 0 && !c->is_head) {
    if (c->chunked) {
      int len = snprintf(size_line, sizeof(size_line), "%zx\r\n", total);

      bufs[n++] = uv_buf_init(size_line, (unsigned) len);
    }
    for (i = 0; i < p->npieces; i++) {
      bufs[n++] = p->pieces[i];
    }
    if (c->chunked) {
      bufs[n++] = uv_buf_init("\r\n", 2);
    }
  }
  p->npieces = 0;

  if (p->message_done && c->chunked && !c->is_head) {
    bufs[n++] = uv_buf_init("0\r\n\r\n", 5);
  }

  if (n == 0) {
    return 0;
  }

  return jv__http_conn_write(c, bufs, n);
}


/* Ends a complete response: pools the upstream connection when both
 * sides allow it, and lets the server go on with the next request. */
static void
finish(jv_pass_t *p)
{
  jv_http_conn_t *c = p->conn;
  jv_stream_t *s = p->s;

  p->s = NULL;
  if (llhttp_should_keep_alive(&p->parser) && !p->extra_bytes) {
    pool_put(p->up, s);
  } else {
    jv_stream_close(s, NULL);
  }

  exchange_end(p);
  jv__http_conn_done(c);
}


static void
upstream_read_cb(jv_stream_t *s, ssize_t nread, const char *data)
{
  jv_pass_t *p = s->data;
  jv_http_conn_t *c = p->conn;
  int rc;

  if (nread < 0) {
    if (nread == UV_EOF && p->headers_done && !p->message_done) {
      /* llhttp_finish returns on_message_complete's HPE_PAUSED. */
      llhttp_finish(&p->parser);
    }
    if (nread == UV_EOF && p->message_done) {
      /* A body delimited by the end of the connection. */
      p->extra_bytes = 1; /* not reusable */
      if (relay(p) != 0) {
        cut(p);
        return;
      }
      finish(p);
      return;
    }

    failed(p, (int) nread);
    return;
  }

  p->last_ms = uv_now(jv__loop());
  rc = parse(p, data, (size_t) nread);
  if (rc != 0) {
    failed(p, rc);
    return;
  }

  if (!p->headers_done) {
    return;
  }

  if (relay(p) != 0) {
    cut(p);
    return;
  }

  if (p->message_done) {
    finish(p);
    return;
  }

  if (c->stream->write_queue >= HTTP_WRITE_HIGH_WATER) {
    jv_stream_read_stop(s);
    p->drain_wait = 1;
  }
}


static void
exchange_start(jv_pass_t *p, jv_stream_t *s)
{
  jv_http_conn_t *c = p->conn;
  uv_buf_t buf = uv_buf_init(c->out, (unsigned) c->out_len);
  int rc;

  p->s = s;
  s->data = p;
  response_reset(p);
  rc = jv_stream_write(s, &buf, 1);
  if (rc == 0) {
    rc = jv_stream_read_start(s, upstream_read_cb);
  }

  if (rc != 0) {
    failed(p, rc);
  }
}


/* The TLS handshake of a new upstream connection ended with status. */
static void
handshake_cb(jv_stream_t *s, int status)
{
  jv_pass_t *p = s->data;

  s->handshake_cb = NULL;
  if (status != 0) {
    fail_to_lua(p, status, 0);
    return;
  }

  p->last_ms = uv_now(jv__loop());
  exchange_start(p, s);
}


static void
connect_cb(uv_connect_t *req, int status)
{
  jv_pass_connect_t *cr = (jv_pass_connect_t *) req;
  jv_pass_t *p = cr->p;
  jv_stream_t *s;

  free(cr);
  if (p == NULL) {
    return; /* the exchange ended and closed the stream */
  }

  p->connecting = NULL;
  if (status != 0) {
    fail_to_lua(p, status, 0);
    return;
  }

  p->last_ms = uv_now(jv__loop());
  s = p->s;
  if (s->ssl == NULL) {
    exchange_start(p, s);
    return;
  }

  /* Sends the ClientHello. handshake_cb runs when the handshake ends,
   * from a read of the server's reply. */
  jv_stream_handshake(s);
  if (p->s == s && s->handshake_cb != NULL &&
      jv_stream_read_start(s, upstream_read_cb) != 0) {
    fail_to_lua(p, JV_ETLS, 0);
  }
}


/* Sends the request on a pooled connection, or on a new one. */
static void
pass_send(jv_pass_t *p)
{
  jv_stream_t *s = pool_take(p->up);
  jv_pass_connect_t *cr;
  int rc;

  if (s != NULL) {
    p->reused = 1;
    exchange_start(p, s);
    return;
  }

  p->reused = 0;
  s = jv_stream_new_tcp();
  cr = malloc(sizeof(*cr));
  if (s == NULL || cr == NULL) {
    free(cr);
    if (s != NULL) {
      jv_stream_close(s, NULL);
    }
    fail_to_lua(p, JV_ENOMEM, 0);
    return;
  }

  uv_tcp_nodelay(&s->uv.tcp, 1);
  p->s = s;
  s->data = p;
  if (p->up->tls != NULL) {
    s->handshake_cb = handshake_cb;
    if (jv_stream_start_tls(s, p->up->tls, 0,
                            p->up->server_name[0] ? p->up->server_name
                                                  : NULL) != 0) {
      free(cr);
      fail_to_lua(p, JV_ETLS, 0);
      return;
    }
  }
  cr->p = p;
  rc = uv_tcp_connect(&cr->req, &s->uv.tcp,
                      (const struct sockaddr *) &p->up->addr, connect_cb);
  if (rc != 0) {
    free(cr);
    fail_to_lua(p, rc, 0);
    return;
  }

  p->connecting = cr;
}


/* Returns the connection's exchange record, made on first use, or NULL
 * when memory runs out. */
static jv_pass_t *
pass_record(jv_http_conn_t *c)
{
  jv_pass_t *p = c->pass;

  if (p == NULL) {
    p = calloc(1, sizeof(*p));
    if (p != NULL) {
      p->conn = c;
      c->pass = p;
    }
  }

  return p;
}


/* Returns non-zero when c's request may be forwarded here: a GET or HEAD
 * without a body, an upgrade or Expect. */
static int
passable(jv_http_conn_t *c)
{
  int method = c->parser.method;

  return (method == HTTP_GET || method == HTTP_HEAD) && c->message_done &&
         c->body_total == 0 && !c->upgrade && !c->parser.upgrade &&
         !c->expect_continue && !c->head_sent;
}


/* Arms the connection's timer for jv__pass_tick: in a second, to check
 * that the client is still there, or when the exchange times out, if
 * that comes first. */
static void
tick_arm(jv_pass_t *p)
{
  uint64_t now = uv_now(jv__loop()), due = p->last_ms + p->timeout_ms;
  uint64_t wait = due > now ? due - now : 0;

  uv_timer_start(&p->conn->timer, jv__http_conn_timer_cb,
                 wait < 1000 ? wait : 1000, 0);
}


/* Starts the exchange of the head in c->out with up. */
static void
exchange_begin(jv_pass_t *p, jv_upstream_t *up, uint64_t timeout_ms,
               int stale_408, unsigned max_headers)
{
  jv_http_conn_t *c = p->conn;

  stats.passed++;
  nexchanges++;
  c->passing = 1;
  up->refs++;
  p->up = up;
  p->timeout_ms = timeout_ms;
  p->stale_408 = stale_408;
  p->max_headers = max_headers;
  p->relaying = 0;
  p->drain_wait = 0;
  p->last_ms = uv_now(jv__loop());
  tick_arm(p);
  pass_send(p);
}


/* ---- the broker's checks ---- */

/* The edge signature's headers, in signing order, then Host. */
enum {
  SIG_TARGET_IP,
  SIG_TARGET_PORT,
  SIG_SLUG,
  SIG_CLIENT_IP,
  SIG_TIMESTAMP,
  SIG_NONCE,
  SIG_BROKER,
  SIG_SIGNATURE,
  SIG_HOST,
  SIG_FIELDS
};

static const struct {
  const char *name;
  size_t len;
} sig_headers[SIG_FIELDS] = {
  { "x-justavps-target-ip", 20 },
  { "x-justavps-target-port", 22 },
  { "x-justavps-slug", 15 },
  { "x-justavps-client-ip", 20 },
  { "x-justavps-timestamp", 20 },
  { "x-justavps-nonce", 16 },
  { "x-justavps-broker", 17 },
  { "x-justavps-signature", 20 },
  { "host", 4 },
};

#define SIG_PREFIX "JUSTAVPS-HMAC-SHA256-V1"


/* Returns the wall clock's whole seconds as Lua's floor(core.time())
 * computes them, through a double: in the last nanoseconds of a second
 * that rounds up, and both sides must agree on the second. */
static int64_t
unix_seconds(void)
{
  struct timespec ts;

  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t) floor((double) ts.tv_sec + (double) ts.tv_nsec / 1e9);
}


/* Returns non-zero when every byte of s is in chars. */
static int
only_chars(const char *s, size_t len, const char *chars)
{
  size_t i;

  for (i = 0; i < len; i++) {
    if (s[i] == '\0' || strchr(chars, s[i]) == NULL) {
      return 0;
    }
  }
  return 1;
}


/* Returns the value of a decimal of 1 to max_digits digits without a
 * leading zero, or -1. */
static int64_t
decimal(const char *s, size_t len, size_t max_digits)
{
  int64_t v = 0;
  size_t i;

  if (len == 0 || len > max_digits || (len > 1 && s[0] == '0')) {
    return -1;
  }
  for (i = 0; i < len; i++) {
    if (s[i] < '0' || s[i] > '9') {
      return -1;
    }
    v = v * 10 + (s[i] - '0');
  }
  return v;
}


/* Copies an IPv4 literal in dotted decimal without leading zeros into
 * out (16 bytes). Returns non-zero when s is one. Other addresses, IPv6
 * among them, go to the Lua checks. */
static int
ipv4_literal(const char *s, size_t len, char *out)
{
  size_t i = 0, start;
  int octets = 0;

  if (len < 7 || len > 15) {
    return 0;
  }
  while (octets < 4) {
    start = i;
    while (i < len && s[i] != '.') {
      i++;
    }
    if (decimal(s + start, i - start, 3) < 0 ||
        decimal(s + start, i - start, 3) > 255) {
      return 0;
    }
    octets++;
    if (i == len) {
      break;
    }
    i++;
  }
  if (octets != 4 || i != len) {
    return 0;
  }
  memcpy(out, s, len);
  out[len] = '\0';
  return 1;
}


/* Returns the slot of key in the open-addressed set of allowed targets:
 * the slot that contains it, or the empty slot where it would go. */
static unsigned
target_slot(const jv_pass_broker_t *b, uint64_t key)
{
  unsigned mask = b->targets_cap - 1;
  unsigned i = (unsigned) ((key * 0x9e3779b97f4a7c15ull) >> 40) & mask;

  while (b->targets[i] != 0 && b->targets[i] != key) {
    i = (i + 1) & mask;
  }
  return i;
}


static int
target_allowed(const jv_pass_broker_t *b, uint64_t key)
{
  return b->targets_cap > 0 && b->targets[target_slot(b, key)] == key;
}


/* Adds key (never 0: a port is at least 1) to the set. Returns 0, or -1
 * when memory runs out. */
static int
target_add(jv_pass_broker_t *b, uint64_t key)
{
  if (2 * (b->ntargets + 1) > b->targets_cap) {
    unsigned cap = b->targets_cap ? b->targets_cap * 2 : 64, i;
    uint64_t *old = b->targets, *nt = calloc(cap, sizeof(*nt));
    unsigned old_cap = b->targets_cap;

    if (nt == NULL) {
      return -1;
    }
    b->targets = nt;
    b->targets_cap = cap;
    for (i = 0; i < old_cap; i++) {
      if (old[i] != 0) {
        b->targets[target_slot(b, old[i])] = old[i];
      }
    }
    free(old);
  }

  b->targets[target_slot(b, key)] = key;
  b->ntargets++;
  return 0;
}


/* Checks c's request as the broker's Lua code does (lua/justavps/broker/
 * app.lua) and forwards it when every check passes. Returns 0, without
 * recording its nonce, when any check fails or cannot be made here, so
 * that the Lua code runs them and reports the failure. */
static int
broker_try(jv_http_conn_t *c, jv_pass_broker_t *b)
{
  const char *v[SIG_FIELDS] = { NULL };
  size_t len[SIG_FIELDS] = { 0 };
  const char *parts[11];
  size_t lens[11];
  const char *skip[JV_HTTP_NAMES_MAX];
  size_t skip_len[JV_HTTP_NAMES_MAX];
  char target_ip[16], client_ip[16], host[256], lines[512], hex[64];
  const char *url = c->head + c->url_off;
  const char *method = llhttp_method_name(c->parser.method);
  int64_t port, timestamp;
  unsigned i, j;
  int n;
  jv_upstream_t *up;
  jv_pass_t *p;

  for (i = 0; i < c->nhdrs; i++) {
    const char *name = c->head + c->hdrs[i].name_off;
    size_t nlen = c->hdrs[i].name_len;

    for (j = 0; j < SIG_FIELDS; j++) {
      if (nlen == sig_headers[j].len &&
          strncasecmp(name, sig_headers[j].name, nlen) == 0) {
        if (v[j] != NULL) {
          return 0; /* sent twice */
        }
        v[j] = c->head + c->hdrs[i].value_off;
        len[j] = c->hdrs[i].value_len;
        break;
      }
    }
  }
  for (j = 0; j < SIG_FIELDS; j++) {
    if (v[j] == NULL) {
      return 0;
    }
  }

  port = decimal(v[SIG_TARGET_PORT], len[SIG_TARGET_PORT], 5);
  timestamp = decimal(v[SIG_TIMESTAMP], len[SIG_TIMESTAMP], 12);
  if (!ipv4_literal(v[SIG_TARGET_IP], len[SIG_TARGET_IP], target_ip) ||
      !ipv4_literal(v[SIG_CLIENT_IP], len[SIG_CLIENT_IP], client_ip) ||
      port < 1 || port > 65535 || timestamp < 0 || len[SIG_SLUG] < 3 ||
      len[SIG_SLUG] > 40 ||
      !only_chars(v[SIG_SLUG], len[SIG_SLUG],
                  "abcdefghijklmnopqrstuvwxyz0123456789-") ||
      len[SIG_NONCE] < 16 || len[SIG_NONCE] > 64 ||
      len[SIG_BROKER] != b->broker_id_len ||
      memcmp(v[SIG_BROKER], b->broker_id, b->broker_id_len) != 0 ||
      len[SIG_SIGNATURE] != 67 || memcmp(v[SIG_SIGNATURE], "v1=", 3) != 0 ||
      !only_chars(v[SIG_SIGNATURE] + 3, 64, "0123456789abcdef") ||
      len[SIG_HOST] == 0 || len[SIG_HOST] >= sizeof(host)) {
    return 0;
  }

  if (llabs(unix_seconds() - timestamp) > (int64_t) b->clock_skew) {
    return 0;
  }

  if (!target_allowed(b, (uint64_t) ntohl(inet_addr(target_ip)) << 16 |
                             (uint64_t) port)) {
    return 0;
  }

  for (i = 0; i < len[SIG_HOST]; i++) {
    host[i] = (char) tolower((unsigned char) v[SIG_HOST][i]);
  }

  parts[0] = SIG_PREFIX;
  lens[0] = sizeof(SIG_PREFIX) - 1;
  parts[1] = method;
  lens[1] = strlen(method);
  parts[2] = host;
  lens[2] = len[SIG_HOST];
  parts[3] = url;
  lens[3] = c->url_len;
  for (j = SIG_TARGET_IP; j <= SIG_BROKER; j++) {
    parts[4 + j] = v[j];
    lens[4 + j] = len[j];
  }
  if (jv__hmac_sha256_join_hex((const unsigned char *) b->secret, b->secret_len,
                               "\n", 1, parts, lens, 11, hex) != 0 ||
      CRYPTO_memcmp(hex, v[SIG_SIGNATURE] + 3, 64) != 0) {
    return 0;
  }

  n = snprintf(lines, sizeof(lines),
               "X-Real-IP: %s\r\nX-Forwarded-For: %s\r\n"
               "X-Forwarded-Proto: %s\r\nX-Forwarded-Host: %.*s\r\n",
               client_ip, client_ip, b->proto, (int) len[SIG_HOST], host);
  if (n < 0 || (size_t) n >= sizeof(lines)) {
    return 0;
  }
  for (i = 0; i < b->drop->n; i++) {
    skip[i] = b->drop->bytes + b->drop->off[i];
    skip_len[i] = b->drop->len[i];
  }

  up = upstream_get(NULL, target_ip, (int) port, 0, NULL);
  p = up != NULL ? pass_record(c) : NULL;
  if (p == NULL ||
      jv__http_pass_head(c, url, c->url_len, 0, skip, skip_len, b->drop->n,
                         lines, (size_t) n, up->host, up->port) != 0) {
    return 0;
  }

  /* Last, because a recorded nonce would make the Lua checks report a
   * replay for this very request. */
  if (jv__nonce_add(b->nonces, v[SIG_NONCE], len[SIG_NONCE]) != 0) {
    return 0;
  }

  up->idle_ms = PASS_BROKER_POOL_IDLE_MS;
  exchange_begin(p, up, b->timeout_ms, 0, PASS_HOP_MAX_HEADERS);
  return 1;
}


/* ---- the edge's cached decisions ---- */

/* Writes into buf (PASS_MAX_KEY bytes) the key of c's request for the
 * edge: method, request-target, and the values of Host, Origin and
 * Authorization, NUL-separated (0x01 for a missing header). Returns its
 * length, or 0 when the request carries what the edge's Lua code must
 * see: a Cookie (filtered per request), a credential in the query, an
 * X-JustAVPS-* header, or Host, Origin or Authorization twice. */
static size_t
edge_key(jv_http_conn_t *c, char *buf)
{
  static const struct {
    const char *name;
    size_t len;
  } keyed[3] = { { "host", 4 }, { "origin", 6 }, { "authorization", 13 } };
  const char *v[3] = { NULL, NULL, NULL };
  size_t vlen[3] = { 0, 0, 0 };
  const char *url = c->head + c->url_off;
  const char *method = llhttp_method_name(c->parser.method);
  const char *q = memchr(url, '?', c->url_len);
  size_t pos, mlen = strlen(method);
  unsigned i, j;

  if (q != NULL) {
    size_t qlen = c->url_len - (size_t) (q - url), k;

    /* The edge reads credentials from the query after decoding it, so
     * any mention of justavps and any encoded underscore counts. */
    for (k = 0; k + 3 <= qlen; k++) {
      if ((k + 8 <= qlen && strncasecmp(q + k, "justavps", 8) == 0) ||
          strncasecmp(q + k, "%5f", 3) == 0) {
        return 0;
      }
    }
  }

  for (i = 0; i < c->nhdrs; i++) {
    const char *name = c->head + c->hdrs[i].name_off;
    size_t nlen = c->hdrs[i].name_len;

    if ((nlen == 6 && strncasecmp(name, "cookie", 6) == 0) ||
        (nlen >= 11 && strncasecmp(name, "x-justavps-", 11) == 0)) {
      return 0;
    }
    for (j = 0; j < 3; j++) {
      if (nlen == keyed[j].len && strncasecmp(name, keyed[j].name, nlen) == 0) {
        if (v[j] != NULL) {
          return 0;
        }
        v[j] = c->head + c->hdrs[i].value_off;
        vlen[j] = c->hdrs[i].value_len;
      }
    }
  }

  if (mlen + c->url_len + vlen[0] + vlen[1] + vlen[2] + 8 > PASS_MAX_KEY) {
    return 0;
  }

  memcpy(buf, method, mlen);
  pos = mlen;
  buf[pos++] = '\0';
  memcpy(buf + pos, url, c->url_len);
  pos += c->url_len;
  for (j = 0; j < 3; j++) {
    buf[pos++] = '\0';
    if (v[j] == NULL) {
      buf[pos++] = '\1';
    } else {
      memcpy(buf + pos, v[j], vlen[j]);
      pos += vlen[j];
    }
  }

  return pos;
}


static jv_edge_entry_t *
edge_find(jv_pass_table_t *t, const char *key, size_t len, uint32_t hash)
{
  jv_edge_entry_t *e;

  for (e = t->edge[hash % PASS_BUCKETS]; e != NULL; e = e->next) {
    if (e->hash == hash && e->key_len == len && memcmp(e->key, key, len) == 0) {
      return e;
    }
  }

  return NULL;
}


/* Fills out with n nonce characters of [A-Za-z0-9_-], uniform because 64
 * divides 256. Returns 0, or -1 when OpenSSL has no random bytes. */
static int
nonce_chars(char *out, size_t n)
{
  static const char alphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
  static unsigned char pool[2048];
  static size_t used = sizeof(pool);
  size_t i;

  if (used + n > sizeof(pool)) {
    if (RAND_bytes(pool, (int) sizeof(pool)) != 1) {
      return -1;
    }
    used = 0;
  }

  for (i = 0; i < n; i++) {
    out[i] = alphabet[pool[used + i] & 63];
  }
  OPENSSL_cleanse(pool + used, n);
  used += n;
  return 0;
}


/* Signs and forwards c's request as the edge's Lua code would, when a
 * decision for its key is recorded and fresh. Returns 0 otherwise. */
static int
edge_try(jv_http_conn_t *c, jv_pass_table_t *t)
{
  char key[PASS_MAX_KEY], target[PASS_MAX_KEY], lines[1024], hex[64];
  char nonce[32], timestamp[24];
  const char *skip[JV_HTTP_NAMES_MAX + 1];
  size_t skip_len[JV_HTTP_NAMES_MAX + 1];
  const char *parts[11];
  size_t lens[11], klen, tlen, client_len;
  const char *method = llhttp_method_name(c->parser.method);
  jv_edge_entry_t *e;
  jv_pass_t *p;
  unsigned i;
  int n;

  klen = edge_key(c, key);
  e = klen > 0 ? edge_find(t, key, klen, hash_bytes(key, klen)) : NULL;
  if (e == NULL || uv_now(jv__loop()) >= e->expires) {
    return 0;
  }

  if (!c->peer_known) {
    if (jv_stream_address(c->stream, 1, c->peer_ip, sizeof(c->peer_ip),
                          &c->peer_port) != 0) {
      return 0;
    }
    c->peer_known = 1;
  }
  client_len = strlen(c->peer_ip);

  tlen = e->prefix_len + c->url_len;
  if (tlen > sizeof(target)) {
    return 0;
  }
  memcpy(target, e->prefix, e->prefix_len);
  memcpy(target + e->prefix_len, c->head + c->url_off, c->url_len);

  snprintf(timestamp, sizeof(timestamp), "%lld", (long long) unix_seconds());
  if (nonce_chars(nonce, sizeof(nonce)) != 0) {
    return 0;
  }

  parts[0] = SIG_PREFIX;
  lens[0] = sizeof(SIG_PREFIX) - 1;
  parts[1] = method;
  lens[1] = strlen(method);
  parts[2] = e->host;
  lens[2] = e->host_len;
  parts[3] = target;
  lens[3] = tlen;
  parts[4] = e->target_ip;
  lens[4] = e->target_ip_len;
  parts[5] = e->target_port;
  lens[5] = e->target_port_len;
  parts[6] = e->slug;
  lens[6] = e->slug_len;
  parts[7] = c->peer_ip;
  lens[7] = client_len;
  parts[8] = timestamp;
  lens[8] = strlen(timestamp);
  parts[9] = nonce;
  lens[9] = sizeof(nonce);
  parts[10] = e->broker_id;
  lens[10] = e->broker_id_len;
  if (jv__hmac_sha256_join_hex((const unsigned char *) e->secret, e->secret_len,
                               "\n", 1, parts, lens, 11, hex) != 0) {
    return 0;
  }

  n = snprintf(lines, sizeof(lines),
               "Host: %.*s\r\n"
               "X-JustAVPS-Target-IP: %.*s\r\n"
               "X-JustAVPS-Target-Port: %.*s\r\n"
               "X-JustAVPS-Slug: %.*s\r\n"
               "X-JustAVPS-Client-IP: %s\r\n"
               "X-JustAVPS-Timestamp: %s\r\n"
               "X-JustAVPS-Nonce: %.*s\r\n"
               "X-JustAVPS-Broker: %.*s\r\n"
               "X-JustAVPS-Signature: v1=%.*s\r\n",
               (int) e->host_len, e->host, (int) e->target_ip_len, e->target_ip,
               (int) e->target_port_len, e->target_port, (int) e->slug_len,
               e->slug, c->peer_ip, timestamp, (int) sizeof(nonce), nonce,
               (int) e->broker_id_len, e->broker_id, 64, hex);
  if (n < 0 || (size_t) n >= sizeof(lines)) {
    return 0;
  }

  /* The received Host gives way to the machine's, as set_headers makes
   * it do on the Lua path. */
  skip[0] = "host";
  skip_len[0] = 4;
  for (i = 0; i < e->drop->n; i++) {
    skip[i + 1] = e->drop->bytes + e->drop->off[i];
    skip_len[i + 1] = e->drop->len[i];
  }

  p = pass_record(c);
  if (p == NULL ||
      jv__http_pass_head(c, target, tlen, 0, skip, skip_len, e->drop->n + 1,
                         lines, (size_t) n, e->up->host, e->up->port) != 0) {
    return 0;
  }

  exchange_begin(p, e->up, e->timeout_ms, 0, PASS_HOP_MAX_HEADERS);
  return 1;
}


uint64_t
jv__pass_generation(void)
{
  return generation;
}


/* Returns non-zero when core.http.pass_reset ran since c's request came:
 * a decision its handler made may rest on what the reset was for (a
 * machine that changed, a reload), so it is not recorded. */
static int
reset_since(const jv_http_conn_t *c)
{
  return c->pass_seen != generation;
}


int
jv__pass_try(jv_http_conn_t *c)
{
  jv_pass_table_t *t = c->server->pass;
  const jv_route_t *route;
  char key[PASS_MAX_KEY];
  size_t klen;
  jv_pass_t *p;

  if (!passable(c)) {
    return 0;
  }

  table_current(t);
  if (t->broker.enabled) {
    return broker_try(c, &t->broker);
  }
  if (t->edge_count > 0) {
    return edge_try(c, t);
  }

  if (c->pass_admitted != generation) {
    return 0;
  }

  klen = request_key(c, t, key);
  route = klen > 0 ? route_find(t, key, klen) : NULL;
  if (route == NULL) {
    return 0;
  }

  p = pass_record(c);
  if (p == NULL ||
      jv__http_pass_head(c, route->target, route->target_len, 1, route->skip,
                         route->skip_len, route->nskip, route->lines,
                         route->lines_len, route->up->host,
                         route->up->port) != 0) {
    return 0;
  }

  exchange_begin(p, route->up, route->timeout_ms, route->stale_408,
                 PASS_MAX_HEADERS);
  return 1;
}


void
jv__pass_tick(jv_http_conn_t *c)
{
  jv_pass_t *p = c->pass;
  uint64_t now = uv_now(jv__loop());

  /* Checked only while the body streams, as proxy.forward checks: a
   * client that half-closed after its request still gets the response,
   * and a FIN looks the same as a close to this check. */
  if (p->relaying && jv_stream_peer_closed(c->stream)) {
    /* The client closed its connection, so the response has no reader. */
    if (p->connecting != NULL) {
      p->connecting->p = NULL;
      p->connecting = NULL;
    }
    cut(p);
    return;
  }

  if (!p->drain_wait && now - p->last_ms >= p->timeout_ms) {
    if (p->connecting != NULL) {
      p->connecting->p = NULL;
      p->connecting = NULL;
      fail_to_lua(p, JV_ETIMEOUT, 0);
      return;
    }
    failed(p, JV_ETIMEOUT);
    return;
  }

  if (p->drain_wait) {
    /* The client's drain restarts the clock: check again in a second. */
    p->last_ms = now;
  }
  tick_arm(p);
}


void
jv__pass_drained(jv_http_conn_t *c)
{
  jv_pass_t *p = c->pass;

  if (p->drain_wait && p->s != NULL) {
    p->drain_wait = 0;
    p->last_ms = uv_now(jv__loop());
    if (jv_stream_read_start(p->s, upstream_read_cb) != 0) {
      cut(p);
    }
  }
}


void
jv__pass_conn_closed(jv_http_conn_t *c)
{
  jv_pass_t *p = c->pass;

  if (c->passing) {
    if (p->connecting != NULL) {
      p->connecting->p = NULL;
    }
    if (p->s != NULL) {
      jv_stream_close(p->s, NULL);
    }
    c->passing = 0;
    nexchanges--;
  }

  free(p->h.head);
  free(p->h.hdrs);
  free(p);
  c->pass = NULL;
}


/* ---- Lua ---- */

/* Returns the string field name of the table at idx, or NULL when nil. */
static const char *
opt_string(lua_State *L, int idx, const char *name, size_t *len)
{
  const char *s;

  lua_getfield(L, idx, name);
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return NULL;
  }
  s = lua_tolstring(L, -1, len);
  if (s == NULL || lua_type(L, -1) != LUA_TSTRING) {
    luaL_error(L, "option %s must be a string", name);
  }
  lua_pop(L, 1); /* the string stays alive in the options table */
  return s;
}


static double
opt_number(lua_State *L, int idx, const char *name, double def)
{
  double v = def;

  lua_getfield(L, idx, name);
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TNUMBER || lua_tonumber(L, -1) <= 0) {
      luaL_error(L, "option %s must be a number above 0", name);
    }
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  return v;
}


/* Reads opts.host, opts.port and opts.target (opts at index 2), raising
 * with fn's name when one is missing. */
static void
read_upstream(lua_State *L, const char *fn, const char **host, size_t *hlen,
              lua_Integer *port, const char **target, size_t *tlen)
{
  *host = opt_string(L, 2, "host", hlen);
  *target = opt_string(L, 2, "target", tlen);
  lua_getfield(L, 2, "port");
  *port = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (*host == NULL || *target == NULL || *port < 1 || *port > 65535) {
    luaL_error(L, "%s: host, port (1 to 65535) and target are required", fn);
  }
}


/* Returns the server's table of decisions, made on first use and
 * emptied of an earlier generation's. Raises when memory runs out. */
static jv_pass_table_t *
server_table(lua_State *L, jv_http_server_t *srv)
{
  jv_pass_table_t *t = srv->pass;

  if (t == NULL) {
    t = calloc(1, sizeof(*t));
    if (t == NULL) {
      luaL_error(L, "out of memory");
      return NULL;
    }
    t->generation = generation;
    srv->pass = t;
  }

  table_current(t);
  return t;
}


/* Reads opts.set_headers (opts at index 2) into names and values, and
 * adds the bytes of their header lines and of their names to *lines_len
 * and *skip_bytes. The table stays on the stack, anchoring the strings.
 * Returns the number of fields, raising on an invalid one. */
static unsigned
read_set_headers(lua_State *L, const char **names, size_t *name_len,
                 const char **values, size_t *value_len, size_t *lines_len,
                 size_t *skip_bytes)
{
  unsigned nset = 0;

  lua_getfield(L, 2, "set_headers");
  if (lua_isnil(L, -1)) {
    return 0;
  }

  luaL_checktype(L, -1, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    if (nset == PASS_MAX_SKIP || lua_type(L, -2) != LUA_TSTRING ||
        lua_type(L, -1) != LUA_TSTRING) {
      luaL_error(L,
                 "option set_headers takes at most %d string names and "
                 "string values",
                 PASS_MAX_SKIP);
    }
    names[nset] = lua_tolstring(L, -2, &name_len[nset]);
    values[nset] = lua_tolstring(L, -1, &value_len[nset]);
    if (!jv__http_name_ok(names[nset], name_len[nset]) ||
        !jv__http_value_ok(values[nset], value_len[nset])) {
      luaL_error(L, "option set_headers has an invalid name or a value "
                    "with CR, LF or NUL");
    }
    *lines_len += name_len[nset] + 2 + value_len[nset] + 2;
    *skip_bytes += name_len[nset];
    nset++;
    lua_pop(L, 1);
  }

  return nset;
}


/* Reads opts.tls and opts.server_name. Returns the stack index of the
 * TLS context, which stays on the stack, or 0 without one. */
static int
read_tls(lua_State *L, const char **server_name)
{
  size_t len;

  *server_name = opt_string(L, 2, "server_name", &len);
  lua_getfield(L, 2, "tls");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return 0;
  }
  return lua_gettop(L);
}


/*
 * req:pass_learn(opts): records that requests on this server with this
 * request's path (and the same value of opts.vary) are forwarded as opts
 * describes, and admits this connection. Its later GET and HEAD requests
 * without a body can then take the fast path. The caller promises
 * that the decision depends on nothing else of the request, and that it
 * admitted the connection by the client's address only. opts:
 *   host, port   upstream (an IPv4 literal) and port
 *   target       request-target path that replaces the request's path;
 *                the request's query is appended to it
 *   set_headers  table name = string value of fields to add; received
 *                fields of those names are dropped (at most 8)
 *   vary         name of the request header whose value is part of the
 *                key (one per server, and a new name drops the others)
 *   timeout      seconds without progress before a 504 (default 60)
 *   pool_idle    seconds an upstream connection stays pooled (default 30)
 *   stale_408    as proxy.forward's option of the same name
 * Returns true, or false when the decision was not recorded (no IPv4
 * literal, or too many upstreams).
 */
static int
l_req_pass_learn(lua_State *L)
{
  jv_http_conn_t *c = jv__http_check_req(L);
  jv_http_server_t *srv = c->server;
  jv_pass_table_t *t = srv->pass;
  size_t hlen, tlen, vlen = 0, klen, lines_len = 0, skip_bytes = 0, size;
  const char *host, *target, *vary;
  const char *names[PASS_MAX_SKIP], *values[PASS_MAX_SKIP];
  size_t name_len[PASS_MAX_SKIP], value_len[PASS_MAX_SKIP];
  unsigned nset = 0, i;
  lua_Integer port;
  jv_upstream_t *up;
  jv_route_t *r;
  char key[PASS_MAX_KEY];
  char *mem;
  const char *server_name;
  double timeout, pool_idle;
  int stale_408, tls_index;

  luaL_checktype(L, 2, LUA_TTABLE);
  read_upstream(L, "pass_learn", &host, &hlen, &port, &target, &tlen);
  vary = opt_string(L, 2, "vary", &vlen);
  if (!jv__http_target_ok(target, tlen) || memchr(target, '?', tlen)) {
    return luaL_error(L, "pass_learn: target must be a path without query, "
                         "blanks or control characters");
  }
  if (vary != NULL &&
      (vlen >= sizeof(t->vary) || !jv__http_name_ok(vary, vlen))) {
    return luaL_error(L, "pass_learn: vary must be a header name");
  }
  timeout = opt_number(L, 2, "timeout", 60);
  pool_idle = opt_number(L, 2, "pool_idle", 30);
  lua_getfield(L, 2, "stale_408");
  stale_408 = lua_toboolean(L, -1);
  lua_pop(L, 1);

  nset = read_set_headers(L, names, name_len, values, value_len, &lines_len,
                          &skip_bytes);
  tls_index = read_tls(L, &server_name);

  t = server_table(L, srv);

  up = upstream_get(L, host, (int) port, tls_index, server_name);
  if (up == NULL && nupstreams >= PASS_MAX_UPSTREAMS) {
    /* Every record serves a route: dropping this server's routes frees
     * them, so that clients who reach many ports cannot keep others off
     * the fast path. */
    table_clear(t);
    up = upstream_get(L, host, (int) port, tls_index, server_name);
  }
  if (up == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }

  if (vlen != t->vary_len ||
      (vary != NULL && strncasecmp(vary, t->vary, vlen) != 0)) {
    table_clear(t);
    memcpy(t->vary, vary != NULL ? vary : "", vlen);
    t->vary[vlen] = '\0';
    t->vary_len = vlen;
  }

  if (reset_since(c)) {
    lua_pushboolean(L, 0);
    return 1;
  }
  c->pass_admitted = generation;
  up->idle_ms = (uint64_t) (pool_idle * 1000);

  klen = request_key(c, t, key);
  if (klen == 0 || route_find(t, key, klen) != NULL) {
    lua_pushboolean(L, klen != 0);
    return 1;
  }
  if (t->count >= PASS_MAX_ROUTES) {
    table_clear(t);
  }

  size = sizeof(*r) + klen + tlen + lines_len + skip_bytes;
  mem = malloc(size);
  if (mem == NULL) {
    return luaL_error(L, "out of memory");
  }
  r = (jv_route_t *) mem;
  mem += sizeof(*r);
  memset(r, 0, sizeof(*r));
  r->up = up;
  up->refs++;
  r->timeout_ms = (uint64_t) (timeout * 1000);
  r->stale_408 = stale_408;
  memcpy(mem, key, klen);
  r->key = mem;
  r->key_len = klen;
  mem += klen;
  memcpy(mem, target, tlen);
  r->target = mem;
  r->target_len = tlen;
  mem += tlen;
  r->lines = mem;
  for (i = 0; i < nset; i++) {
    memcpy(mem, names[i], name_len[i]);
    memcpy(mem + name_len[i], ": ", 2);
    memcpy(mem + name_len[i] + 2, values[i], value_len[i]);
    memcpy(mem + name_len[i] + 2 + value_len[i], "\r\n", 2);
    mem += name_len[i] + 2 + value_len[i] + 2;
  }
  r->lines_len = lines_len;
  for (i = 0; i < nset; i++) {
    memcpy(mem, names[i], name_len[i]);
    r->skip[i] = mem;
    r->skip_len[i] = name_len[i];
    mem += name_len[i];
  }
  r->nskip = nset;
  r->hash = hash_bytes(key, klen);
  r->next = t->buckets[r->hash % PASS_BUCKETS];
  t->buckets[r->hash % PASS_BUCKETS] = r;
  t->count++;

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * req:pass(opts): forwards this request in C now, for a handler that
 * decides per request (the broker checks each request's signature). The
 * handler returns nothing after it, and the server sends the response.
 * Only a GET or HEAD without a body, an upgrade or Expect qualifies, and
 * not a request that the fast path already failed. opts:
 *   host, port     upstream: an IPv4 literal and a port
 *   target         request-target to send, query included
 *   drop_headers   a list from core.http.header_names: received fields
 *                  not forwarded
 *   extra_headers  a string of complete "Name: value\r\n" lines to add
 *   timeout, pool_idle, stale_408  as for req:pass_learn
 * Returns true when it took the request, else false and a reason. A
 * failure before the response runs the handler again, where
 * req:pass_failure returns what failed.
 */
static int
l_req_pass(lua_State *L)
{
  jv_http_conn_t *c = jv__http_check_req(L);
  const char *skip[JV_HTTP_NAMES_MAX + PASS_MAX_SKIP];
  size_t skip_len[JV_HTTP_NAMES_MAX + PASS_MAX_SKIP];
  const char *names[PASS_MAX_SKIP], *values[PASS_MAX_SKIP];
  size_t name_len[PASS_MAX_SKIP], value_len[PASS_MAX_SKIP];
  size_t hlen, tlen, xlen = 0, lines_len = 0, skip_bytes = 0, llen;
  const char *host, *target, *extra, *server_name, *lines;
  jv_http_names_t *drop = NULL;
  unsigned nskip = 0, nset, i;
  lua_Integer port;
  jv_upstream_t *up;
  jv_pass_t *p;
  luaL_Buffer buf;
  double timeout, pool_idle, max_headers;
  int stale_408, code, tls_index;

  luaL_checktype(L, 2, LUA_TTABLE);
  read_upstream(L, "pass", &host, &hlen, &port, &target, &tlen);
  extra = opt_string(L, 2, "extra_headers", &xlen);
  if (!jv__http_target_ok(target, tlen)) {
    return luaL_error(L, "pass: target must be non-empty, without blanks or "
                         "control characters");
  }
  if (extra != NULL) {
    jv__http_check_header_lines(L, extra, xlen);
  }
  lua_getfield(L, 2, "drop_headers");
  if (!lua_isnil(L, -1)) {
    drop = jv__http_to_names(L, lua_gettop(L));
    if (drop == NULL) {
      return luaL_error(L, "pass: drop_headers must come from "
                           "core.http.header_names");
    }
    for (i = 0; i < drop->n; i++) {
      skip[nskip] = drop->bytes + drop->off[i];
      skip_len[nskip++] = drop->len[i];
    }
  }
  timeout = opt_number(L, 2, "timeout", 60);
  pool_idle = opt_number(L, 2, "pool_idle", 30);
  lua_getfield(L, 2, "stale_408");
  stale_408 = lua_toboolean(L, -1);
  max_headers = opt_number(L, 2, "max_headers", PASS_MAX_HEADERS);
  nset = read_set_headers(L, names, name_len, values, value_len, &lines_len,
                          &skip_bytes);
  for (i = 0; i < nset; i++) {
    skip[nskip] = names[i];
    skip_len[nskip++] = name_len[i];
  }
  tls_index = read_tls(L, &server_name);

  /* The header lines: set_headers, then extra_headers, as forward_head
   * writes them. */
  luaL_buffinit(L, &buf);
  for (i = 0; i < nset; i++) {
    luaL_addlstring(&buf, names[i], name_len[i]);
    luaL_addlstring(&buf, ": ", 2);
    luaL_addlstring(&buf, values[i], value_len[i]);
    luaL_addlstring(&buf, "\r\n", 2);
  }
  if (extra != NULL) {
    luaL_addlstring(&buf, extra, xlen);
  }
  luaL_pushresult(&buf);
  lines = lua_tolstring(L, -1, &llen);

  if (!passable(c) || c->pass_failed != 0) {
    lua_pushboolean(L, 0);
    lua_pushliteral(L, "not_passable");
    return 2;
  }

  up = upstream_get(L, host, (int) port, tls_index, server_name);
  p = up != NULL ? pass_record(c) : NULL;
  if (p == NULL || jv__http_pass_head(c, target, tlen, 0, skip, skip_len, nskip,
                                      lines, llen, up->host, up->port) != 0) {
    lua_pushboolean(L, 0);
    lua_pushstring(L, up == NULL ? "no_upstream_slot" : "no_memory");
    return 2;
  }
  up->idle_ms = (uint64_t) (pool_idle * 1000);

  p->in_lua_call = 1;
  p->sync_failed = 0;
  exchange_begin(p, up, (uint64_t) (timeout * 1000), stale_408,
                 (unsigned) max_headers);
  p->in_lua_call = 0;
  code = p->sync_failed;
  if (code != 0) {
    stats.passed--;
    lua_pushboolean(L, 0);
    lua_pushstring(L, jv_err_name(code));
    return 2;
  }

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * req:pass_learn_target(opts): for the broker. Sets the server's checks
 * of the edge signature, once per generation, and records that the
 * target policy allows opts.target_ip:opts.target_port. Later GET and
 * HEAD requests without a body that pass every check of
 * lua/justavps/broker/app.lua in C, to such a target, are forwarded
 * there without Lua. opts: secret, broker_id, clock_skew (seconds),
 * nonces (the core.nonce cache), forwarded_proto, timeout (seconds),
 * drop_headers (a list from core.http.header_names), target_ip,
 * target_port. Returns true, or false when the target is not recorded
 * (no IPv4 literal, or PASS_MAX_TARGETS recorded).
 */
static int
l_req_pass_learn_target(lua_State *L)
{
  jv_http_conn_t *c = jv__http_check_req(L);
  jv_http_server_t *srv = c->server;
  jv_pass_table_t *t = srv->pass;
  jv_pass_broker_t *b;
  size_t len;
  const char *s;
  char ip[16];
  lua_Integer port;
  uint64_t key;

  luaL_checktype(L, 2, LUA_TTABLE);
  t = server_table(L, srv);
  b = &t->broker;
  if (reset_since(c)) {
    lua_pushboolean(L, 0);
    return 1;
  }

  if (!b->enabled) {
    const char *secret = opt_string(L, 2, "secret", &b->secret_len);
    const char *id = opt_string(L, 2, "broker_id", &b->broker_id_len);
    const char *proto = opt_string(L, 2, "forwarded_proto", &len);
    jv_http_names_t *drop;

    if (secret == NULL || b->secret_len == 0 || id == NULL ||
        b->broker_id_len >= sizeof(b->broker_id) || proto == NULL ||
        len >= sizeof(b->proto)) {
      return luaL_error(L, "pass_learn_target: secret, broker_id and "
                           "forwarded_proto are required");
    }
    b->clock_skew = opt_number(L, 2, "clock_skew", 30);
    b->timeout_ms = (uint64_t) (opt_number(L, 2, "timeout", 60) * 1000);
    lua_getfield(L, 2, "nonces");
    b->nonces = jv__nonce_cache(L, -1);
    lua_getfield(L, 2, "drop_headers");
    drop = jv__http_to_names(L, -1);
    if (drop == NULL) {
      return luaL_error(L, "pass_learn_target: drop_headers must come from "
                           "core.http.header_names");
    }
    b->secret = malloc(b->secret_len);
    if (b->secret == NULL) {
      return luaL_error(L, "out of memory");
    }
    memcpy(b->secret, secret, b->secret_len);
    memcpy(b->broker_id, id, b->broker_id_len);
    memcpy(b->proto, proto, len + 1);
    b->drop = drop;
    b->drop_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    b->nonces_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    b->enabled = 1;
  }

  s = opt_string(L, 2, "target_ip", &len);
  lua_getfield(L, 2, "target_port");
  port = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (s == NULL || !ipv4_literal(s, len, ip) || port < 1 || port > 65535 ||
      b->ntargets >= PASS_MAX_TARGETS) {
    lua_pushboolean(L, 0);
    return 1;
  }

  key = (uint64_t) ntohl(inet_addr(ip)) << 16 | (uint64_t) port;
  if (!target_allowed(b, key) && target_add(b, key) != 0) {
    return luaL_error(L, "out of memory");
  }

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * req:pass_learn_edge(opts): for the edge. Records that requests with
 * this request's method, request-target and values of Host, Origin and
 * Authorization are allowed for ttl seconds and go to a broker as opts
 * describes. A request with a Cookie, a credential in the query or an
 * X-JustAVPS-* header is never recorded. The server then signs and forwards
 * such a GET or HEAD without a body in C. opts: ttl, host (the signed host),
 * prefix (put before the request-target, or ""), target (what the edge sends,
 * which must be prefix and the request-target), target_ip, target_port, slug,
 * broker_id, secret, broker_host, broker_port, tls, server_name,
 * drop_headers (a list from core.http.header_names), timeout. Returns
 * true, or false when the request has what the edge must see itself or
 * the broker is no IPv4 literal.
 */
static int
l_req_pass_learn_edge(lua_State *L)
{
  jv_http_conn_t *c = jv__http_check_req(L);
  jv_http_server_t *srv = c->server;
  jv_pass_table_t *t = srv->pass;
  const char *fields[8];
  size_t flen[8], klen, size, bhlen;
  static const char *const names[8] = {
    "host", "prefix",    "target_ip", "target_port",
    "slug", "broker_id", "secret",    "server_name",
  };
  char key[PASS_MAX_KEY];
  const char *broker_host, *target;
  size_t target_len;
  jv_edge_entry_t *e, *old;
  jv_upstream_t *up;
  jv_http_names_t *drop;
  lua_Integer broker_port;
  double ttl, timeout;
  int tls_index = 0, drop_index;
  uint32_t hash;
  char *mem;
  unsigned i;

  luaL_checktype(L, 2, LUA_TTABLE);
  for (i = 0; i < 8; i++) {
    fields[i] = opt_string(L, 2, names[i], &flen[i]);
    if (fields[i] == NULL && i < 7) {
      return luaL_error(L, "pass_learn_edge: option %s is required", names[i]);
    }
  }
  broker_host = opt_string(L, 2, "broker_host", &bhlen);
  lua_getfield(L, 2, "broker_port");
  broker_port = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (broker_host == NULL || broker_port < 1 || broker_port > 65535) {
    return luaL_error(L, "pass_learn_edge: broker_host and broker_port "
                         "(1 to 65535) are required");
  }
  ttl = opt_number(L, 2, "ttl", 5);
  timeout = opt_number(L, 2, "timeout", 60);
  lua_getfield(L, 2, "tls");
  if (!lua_isnil(L, -1)) {
    tls_index = lua_gettop(L);
  }
  lua_getfield(L, 2, "drop_headers");
  drop_index = lua_gettop(L);
  drop = jv__http_to_names(L, drop_index);
  if (drop == NULL) {
    return luaL_error(L, "pass_learn_edge: drop_headers must come from "
                         "core.http.header_names");
  }

  t = server_table(L, srv);

  if (reset_since(c)) {
    lua_pushboolean(L, 0);
    return 1;
  }

  /* The edge sends the prefix and the request-target as received, so a
   * target of its own that differs (a query it rewrote) is not cached. */
  target = opt_string(L, 2, "target", &target_len);
  klen = edge_key(c, key);
  if (target == NULL || target_len != flen[1] + c->url_len ||
      memcmp(target, fields[1], flen[1]) != 0 ||
      memcmp(target + flen[1], c->head + c->url_off, c->url_len) != 0) {
    klen = 0;
  }
  up = klen > 0 ? upstream_get(L, broker_host, (int) broker_port, tls_index,
                               fields[7])
                : NULL;
  if (up == NULL) {
    lua_pushboolean(L, 0);
    return 1;
  }

  if (t->edge_count >= PASS_MAX_ROUTES) {
    edge_clear(t);
  }

  size = sizeof(*e) + klen;
  for (i = 0; i < 7; i++) {
    size += flen[i] + 1;
  }
  mem = malloc(size);
  if (mem == NULL) {
    return luaL_error(L, "out of memory");
  }
  e = (jv_edge_entry_t *) mem;
  memset(e, 0, sizeof(*e));
  mem += sizeof(*e);
  memcpy(mem, key, klen);
  e->key = mem;
  e->key_len = klen;
  mem += klen;
  {
    const char **dst[7] = { &e->host,        &e->prefix, &e->target_ip,
                            &e->target_port, &e->slug,   &e->broker_id,
                            &e->secret };
    size_t *dlen[7] = { &e->host_len,        &e->prefix_len, &e->target_ip_len,
                        &e->target_port_len, &e->slug_len,   &e->broker_id_len,
                        &e->secret_len };

    for (i = 0; i < 7; i++) {
      memcpy(mem, fields[i], flen[i]);
      mem[flen[i]] = '\0';
      if (i == 0) {
        /* The signed host is lowercase (lua/justavps/edge_sig.lua). */
        size_t k;

        for (k = 0; k < flen[i]; k++) {
          mem[k] = (char) tolower((unsigned char) mem[k]);
        }
      }
      *dst[i] = mem;
      *dlen[i] = flen[i];
      mem += flen[i] + 1;
    }
  }
  e->expires = uv_now(jv__loop()) + (uint64_t) (ttl * 1000);
  e->timeout_ms = (uint64_t) (timeout * 1000);
  e->up = up;
  up->refs++;
  lua_pushvalue(L, drop_index);
  e->drop_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  e->drop = drop;

  hash = hash_bytes(key, klen);
  e->hash = hash;
  old = edge_find(t, key, klen, hash);
  if (old != NULL) {
    jv_edge_entry_t **link = &t->edge[hash % PASS_BUCKETS];

    while (*link != old) {
      link = &(*link)->next;
    }
    *link = old->next;
    edge_free(old);
    t->edge_count--;
  }
  e->next = t->edge[hash % PASS_BUCKETS];
  t->edge[hash % PASS_BUCKETS] = e;
  t->edge_count++;

  lua_pushboolean(L, 1);
  return 1;
}


/*
 * req:pass_failure([consume]): returns nil unless the fast path took this
 * request and its exchange failed before the response. Then it returns
 * the failure's code as core.tcp names it ("ECONNREFUSED", "closed",
 * "timeout", ...), a message, whether the connection to the upstream had
 * been made, and the upstream's host and port. With consume, later calls return
 * nil and req:pass may forward the request again.
 */
static int
l_req_pass_failure(lua_State *L)
{
  jv_http_conn_t *c = jv__http_check_req(L);
  int code = c->pass_failed;

  if (code == 0) {
    lua_pushnil(L);
    return 1;
  }

  if (lua_toboolean(L, 2)) {
    c->pass_failed = 0;
  }

  lua_pushstring(L, jv_err_name(code));
  if (c->pass->fail_reason != NULL) {
    lua_pushfstring(L, "malformed response: %s", c->pass->fail_reason);
  } else {
    lua_pushstring(L, jv_strerror(code));
  }
  lua_pushboolean(L, c->pass_connected);
  lua_pushstring(L, c->pass->failed_host);
  lua_pushinteger(L, c->pass->failed_port);
  return 5;
}


/* core.http.pass_reset([close]): drops every recorded decision and
 * admission, and with close, closes the fast path's idle upstream
 * connections. */
static int
l_pass_reset(lua_State *L)
{
  jv_upstream_t *up;

  generation++;
  if (lua_toboolean(L, 1)) {
    for (up = upstreams; up != NULL; up = up->next) {
      pool_close_all(up);
    }
  }
  return 0;
}


/* core.http.pass_stats(): { passed, fallback, pooled, exchanges }. */
static int
l_pass_stats(lua_State *L)
{
  lua_createtable(L, 0, 4);
  lua_pushnumber(L, (lua_Number) stats.passed);
  lua_setfield(L, -2, "passed");
  lua_pushnumber(L, (lua_Number) stats.fallback);
  lua_setfield(L, -2, "fallback");
  lua_pushinteger(L, npooled);
  lua_setfield(L, -2, "pooled");
  lua_pushinteger(L, nexchanges);
  lua_setfield(L, -2, "exchanges");
  return 1;
}


void
jv__pass_register(lua_State *L, int index, int request_methods)
{
  if (request_methods) {
    lua_pushcfunction(L, l_req_pass_learn);
    lua_setfield(L, index, "pass_learn");
    lua_pushcfunction(L, l_req_pass_failure);
    lua_setfield(L, index, "pass_failure");
    lua_pushcfunction(L, l_req_pass);
    lua_setfield(L, index, "pass");
    lua_pushcfunction(L, l_req_pass_learn_target);
    lua_setfield(L, index, "pass_learn_target");
    lua_pushcfunction(L, l_req_pass_learn_edge);
    lua_setfield(L, index, "pass_learn_edge");
    return;
  }

  llhttp_settings_init(&settings);
  settings.on_message_begin = on_message_begin;
  settings.on_header_field = on_header_field;
  settings.on_header_value = on_header_value;
  settings.on_headers_complete = on_headers_complete;
  settings.on_body = on_body;
  settings.on_message_complete = on_message_complete;

  lua_pushcfunction(L, l_pass_reset);
  lua_setfield(L, index, "pass_reset");
  lua_pushcfunction(L, l_pass_stats);
  lua_setfield(L, index, "pass_stats");
}
