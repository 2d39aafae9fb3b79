/*
 * http_server.h: the HTTP server's connection and server records, shared
 * by http.c, which parses requests and runs Lua handlers, and
 * http_pass.c, which forwards requests whose decision Lua has cached.
 */
#ifndef JV_HTTP_SERVER_H
#define JV_HTTP_SERVER_H

#include "http_internal.h"

typedef struct jv_pass_table_s jv_pass_table_t;
typedef struct jv_pass_s jv_pass_t;

/* A handler writing faster than the client reads waits above this. */
#define HTTP_WRITE_HIGH_WATER (256 * 1024)

/* Reading stops once this much body is buffered unread. */
#define HTTP_BODY_HIGH_WATER (64 * 1024)

enum {
  CONN_HEAD = 0, /* reading a request head */
  CONN_HANDLER,  /* a handler owns the current request */
  CONN_CLOSING,
};

typedef struct jv_http_server_s jv_http_server_t;
typedef struct jv_http_conn_s jv_http_conn_t;

typedef struct {
  jv_http_conn_t *conn; /* NULL once the request is over */
} jv_http_req_box_t;

struct jv_http_server_s {
  jv_listener_t *listener;
  int handler_ref; /* the Lua wrapper that calls the handler */
  jv_http_limits_t limits;
  jv_http_conn_t *conns; /* every open connection */
  unsigned nconns;
  unsigned nbusy; /* connections inside a handler */
  int draining;
  int drain_ref; /* coroutine parked in server:drain() */
  uv_timer_t *drain_timer;
  int drain_timed_out;
  int access_log;
  int closed;
  uint64_t refused;      /* connections closed at max_connections */
  jv_pass_table_t *pass; /* decisions cached by req:pass_learn, or NULL */
};

struct jv_http_conn_s {
  jv_http_server_t *server;
  jv_sock_t *sock;
  int sock_ref;
  jv_stream_t *stream;
  llhttp_t parser;
  uv_timer_t timer; /* header and keep-alive idle timeouts */
  int handles;      /* open handles: timer (+ stream via sock) */
  int state;

  /* Request head: URL and header bytes, referred to by offsets. */
  char *head;
  size_t head_len;
  size_t head_cap;
  uint32_t url_off;
  uint32_t url_len;
  jv_http_header_t *hdrs;
  unsigned nhdrs;
  unsigned hdr_cap;
  int last_was_value;
  unsigned crlf_run; /* bare-LF scan of the head */
  char prev_byte;
  int head_scanned;

  /* Input the parser has not consumed because it is paused. */
  char *pending;
  size_t pending_len;
  size_t pending_cap;
  int paused;
  int upgrade;

  /* Request body read so far but not yet taken by the handler. */
  char *body;
  size_t body_len;
  size_t body_cap;
  uint64_t body_total;
  int body_done;
  int discard_body;
  int reader_ref;
  int writer_ref;

  /* Response head being built; reused across requests. */
  char *out;
  size_t out_len;
  size_t out_cap;

  /* Response. */
  jv_http_req_box_t *box;
  int req_ref; /* anchors the request userdata */
  uint64_t start_ms;
  uint64_t requests;
  char req_id[24];
  int status;
  uint64_t bytes_sent;
  int keep_alive;
  int head_sent;
  int chunked;
  int response_done;
  int is_head;
  int expect_continue;
  int continue_sent;
  int hijacked;
  int message_done;
  int head_started; /* bytes of the next request have arrived */
  int head_content; /* the head scan has passed leading empty lines */
  int wait_drain;   /* the next request waits for output to drain */
  size_t ext_len;   /* chunk-extension bytes in the current chunk */
  int peer_eof;     /* the client closed its side */

  /* The client's address, looked up once per connection by req:peer. */
  char peer_ip[64];
  int peer_port;
  int peer_known;

  /* A limit a parser callback hit, sent instead of llhttp's reason. */
  int reject_status;
  const char *reject_code;
  const char *reject_message;

  /* The fast path (http_pass.c): the exchange in progress, the table
   * generation at which Lua admitted this connection (0: not admitted),
   * and why the last exchange failed before its response, for
   * req:pass_failure. */
  jv_pass_t *pass;
  int passing;        /* an exchange of http_pass.c owns the request */
  uint64_t pass_seen; /* the decisions' generation when the request came */
  uint64_t pass_admitted;
  int pass_failed;    /* error code, 0 for none */
  int pass_connected; /* the failure came after the connect */

  jv_http_conn_t *next;
  jv_http_conn_t *prev;
};


/* http.c, for http_pass.c. */
int jv__http_conn_write(jv_http_conn_t *c, const uv_buf_t *bufs, unsigned n);
void jv__http_conn_done(jv_http_conn_t *c);
void jv__http_conn_close(jv_http_conn_t *c);
void jv__http_conn_to_lua(jv_http_conn_t *c);
void jv__http_conn_timer_cb(uv_timer_t *t);

/* Returns the connection of the request object at index 1, raising when
 * the request is over. */
jv_http_conn_t *jv__http_check_req(lua_State *L);

/* Builds in c->out the head that forwards c's request to the upstream of
 * a decision: target (with the request's query when append_query), the
 * end-to-end fields minus those named in skip (nskip lower-case names),
 * then lines (complete "Name: value\r\n" lines) and host as Host when the
 * request has none. Returns 0 or JV_ENOMEM. */
int jv__http_pass_head(jv_http_conn_t *c, const char *target, size_t tlen,
                       int append_query, const char *const *skip,
                       const size_t *skip_len, unsigned nskip,
                       const char *lines, size_t lines_len, const char *host,
                       int port);

/* Raises unless s contains complete "Name: value\r\n" lines without Host,
 * Content-Length or a hop-by-hop name (req:forward_head's extra_headers). */
void jv__http_check_header_lines(lua_State *L, const char *s, size_t len);

/* Builds in c->out the head that relays a response with status and the
 * fields of hdrs (into head), as req:relay does. Returns 0 or JV_ENOMEM. */
int jv__http_pass_relay_head(jv_http_conn_t *c, int status, const char *head,
                             const jv_http_header_t *hdrs, unsigned n);

/* http_pass.c, for http.c. */

/* Forwards c's request in C when a cached decision covers it. Returns 1
 * when it took the request, 0 when the Lua handler must run. */
int jv__pass_try(jv_http_conn_t *c);

/* Returns the generation of the recorded decisions, which
 * core.http.pass_reset advances. */
uint64_t jv__pass_generation(void);

/* The connection is closing: ends its exchange, if any. */
void jv__pass_conn_closed(jv_http_conn_t *c);

/* The client's output drained below the high-water mark. */
void jv__pass_drained(jv_http_conn_t *c);

/* One second passed on the connection's timer during an exchange. */
void jv__pass_tick(jv_http_conn_t *c);

/* Adds req:pass_learn and req:pass_failure to the table at index when
 * request_methods is non-zero, else core.http.pass_reset and
 * core.http.pass_stats. */
void jv__pass_register(lua_State *L, int index, int request_methods);

#endif /* JV_HTTP_SERVER_H */
