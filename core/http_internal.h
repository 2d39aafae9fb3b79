/*
 * http_internal.h: what the HTTP server and client share.
 */
#ifndef JV_HTTP_INTERNAL_H
#define JV_HTTP_INTERNAL_H

#include "internal.h"

#include <llhttp.h>

/* One header field: offsets and lengths into the head buffer. */
typedef struct {
  uint32_t name_off;
  uint32_t name_len;
  uint32_t value_off;
  uint32_t value_len;
} jv_http_header_t;

/* A received message head: the bytes the parser reported, and the header
 * fields as offsets into them. The HTTP client and the proxy's fast path
 * fill it from llhttp's callbacks. */
typedef struct {
  char *head;
  size_t head_len;
  size_t head_cap;
  jv_http_header_t *hdrs;
  unsigned nhdrs;
  unsigned hdr_cap;
  int last_was_value;
} jv_http_head_t;

/* Append len bytes at at to h, as part of the current field name or value
 * (jv__http_head_field, jv__http_head_value) or of nothing
 * (jv__http_head_append). Each returns 0, JV_ETOOLARGE when the head would
 * pass max_size bytes or max_headers fields, or JV_ENOMEM. */
int jv__http_head_append(jv_http_head_t *h, const char *at, size_t len,
                         size_t max_size);
int jv__http_head_field(jv_http_head_t *h, const char *at, size_t len,
                        size_t max_size, unsigned max_headers);
int jv__http_head_value(jv_http_head_t *h, const char *at, size_t len,
                        size_t max_size);

typedef struct {
  size_t max_header_size;   /* bytes of request-target plus header fields */
  unsigned max_headers;     /* header fields */
  size_t max_url;           /* bytes of request-target */
  uint64_t max_body;        /* bytes of request body */
  double header_timeout;    /* seconds to receive a whole head */
  double idle_timeout;      /* seconds a keep-alive connection may idle,
                               and a body read may wait */
  unsigned max_connections; /* open connections; 0 for no limit */
} jv_http_limits_t;

/* Returns the cached IMF-fixdate for the current second. */
const char *jv__http_date(void);

/* Returns the reason phrase for a status code. */
const char *jv__http_reason(int status);

/* Finds the first header named name (case-insensitive); returns its value
 * and length, or NULL. */
const char *jv__http_find_header(const char *head, const jv_http_header_t *hdrs,
                                 unsigned n, const char *name, size_t *len);

/* Pushes a table of lower-case names to values; a repeated header maps to
 * an array of its values in order. */
void jv__http_push_headers(lua_State *L, const char *head,
                           const jv_http_header_t *hdrs, unsigned n);

/* Pushes {{name, value}, ...} in the order received, names unchanged. */
void jv__http_push_header_list(lua_State *L, const char *head,
                               const jv_http_header_t *hdrs, unsigned n);

/* Writes the response head for status to the client of the request
 * object at req_index, with the end-to-end fields of hdrs (into head) as
 * received: hop-by-hop ones and those named in Connection are dropped.
 * Keeps a Content-Length and otherwise chunks the body as
 * req:send_head does. Returns the number of Lua results pushed: true, or
 * nil, message, code when the write fails. */
int jv__http_relay_head(lua_State *L, int req_index, int status,
                        const char *head, const jv_http_header_t *hdrs,
                        unsigned n);

/* Returns the userdata at idx when its metatable is the one registered
 * as tname, and raises as luaL_checkudata does otherwise. *mt keeps the
 * metatable's address after the first call, so that later calls compare
 * one pointer instead of looking tname up in the registry. The process
 * runs one Lua state, whose registered metatables live until it closes. */
static inline void *
jv__check_udata(lua_State *L, int idx, const char *tname, const void **mt)
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

/* Source of a Lua __index for a userdata: called with a methods table and
 * a C function (object, key) for the other keys, it returns the __index
 * function. */
extern const char jv__http_index_src[];
extern const size_t jv__http_index_src_len;

/* Most body pieces jv__http_relay_response takes in one call. */
#define JV_HTTP_RELAY_MAX_PIECES 16

/* Like jv__http_relay_head for a final status (200 or more), and writes
 * the nbody body pieces in the same write (as one chunk when the response
 * is chunked). When complete is non-zero the pieces are the whole body:
 * the response ends as req:finish ends it. Returns the number of Lua
 * results pushed: true, "done" or "more", or nil, message, code when the
 * write fails. */
int jv__http_relay_response(lua_State *L, int req_index, int status,
                            const char *head, const jv_http_header_t *hdrs,
                            unsigned n, const uv_buf_t *body, unsigned nbody,
                            int complete);

/* Returns non-zero when a header value contains no CR, LF or NUL, the
 * bytes that would let a value inject another field. */
int jv__http_value_ok(const char *v, size_t len);

/* Returns non-zero when a header name is non-empty and free of blanks,
 * control characters and colons. */
int jv__http_name_ok(const char *v, size_t len);

/* Scans len bytes of a response head for a bare LF or a line that starts
 * with a space or tab (obsolete folding), carrying its state across
 * calls, and sets *scanned at the blank line that ends the head. Returns
 * -1 on either fault, else 0. */
int jv__http_scan_head(char *prev_byte, unsigned *crlf_run, int *scanned,
                       const char *data, size_t len);

/* Returns non-zero when a request-target is non-empty and free of blanks
 * and control characters. */
int jv__http_target_ok(const char *s, size_t len);

/* Returns non-zero when the comma-separated list v (a Connection value,
 * say) contains token in any case; blanks around elements are ignored. */
int jv__http_list_has_token(const char *v, size_t vlen, const char *token,
                            size_t tlen);

/* Scans n bytes of a message head that contain no LF, as the bare-LF and
 * folded-line checks of the server and the client read them: returns -1
 * when a line starts with a space or tab, and otherwise updates the byte
 * before the next one, resets *crlf_run and sets *content (when not NULL)
 * if a byte other than CR is among them. */
int jv__http_scan_line_bytes(char *prev_byte, unsigned *crlf_run, int *content,
                             const char *s, size_t n);

/* Adds the HTTP client functions (http_client.c) to the core.http table
 * at table_index. */
void jv__http_client_register(lua_State *L, int table_index);

/* A fixed list of header field names in lower case, made by
 * core.http.header_names: name i is len[i] bytes at bytes + off[i]. */
#define JV_HTTP_NAMES_MAX 64
#define JV_HTTP_NAME_MAX  256

typedef struct {
  unsigned n;
  uint16_t off[JV_HTTP_NAMES_MAX];
  uint16_t len[JV_HTTP_NAMES_MAX];
  char bytes[];
} jv_http_names_t;

/* Returns the name list at idx, or NULL when the value there is not one. */
jv_http_names_t *jv__http_to_names(lua_State *L, int idx);

/* Returns the index of name (compared without case) in names, or -1. */
int jv__http_names_find(const jv_http_names_t *names, const char *name,
                        size_t len);

/* Sets core.http.header_names in the table at table_index and registers
 * the metatable of name lists. */
void jv__http_names_register(lua_State *L, int table_index);

#endif /* JV_HTTP_INTERNAL_H */
