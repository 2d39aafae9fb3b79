/*
 * http_headers.c: header fields as Lua tables, for the server's request
 * and the client's response, which both keep them as offsets into a head
 * buffer, and the head storage the client and the fast path fill.
 */
#include "http_internal.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>


/* Pushes name in lower case: header names are case-insensitive. */
static void
push_lower(lua_State *L, const char *s, size_t len)
{
  luaL_Buffer b;
  size_t i;

  luaL_buffinit(L, &b);
  for (i = 0; i < len; i++) {
    char ch = s[i];

    luaL_addchar(&b, (ch >= 'A' && ch <= 'Z') ? (char) (ch + 32) : ch);
  }
  luaL_pushresult(&b);
}


void
jv__http_push_headers(lua_State *L, const char *head,
                      const jv_http_header_t *hdrs, unsigned n)
{
  unsigned i;

  lua_createtable(L, 0, (int) n);

  for (i = 0; i < n; i++) {
    const jv_http_header_t *h = &hdrs[i];

    push_lower(L, head + h->name_off, h->name_len);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);

    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, head + h->value_off, h->value_len);
      lua_rawset(L, -3);

    } else if (lua_istable(L, -1)) {
      lua_pushlstring(L, head + h->value_off, h->value_len);
      lua_rawseti(L, -2, (int) lua_objlen(L, -2) + 1);
      lua_pop(L, 2);

    } else {
      /* A second value turns the entry into an array of both. */
      lua_createtable(L, 2, 0);
      lua_insert(L, -2);
      lua_rawseti(L, -2, 1);
      lua_pushlstring(L, head + h->value_off, h->value_len);
      lua_rawseti(L, -2, 2);
      lua_rawset(L, -3);
    }
  }
}


void
jv__http_push_header_list(lua_State *L, const char *head,
                          const jv_http_header_t *hdrs, unsigned n)
{
  unsigned i;

  lua_createtable(L, (int) n, 0);

  for (i = 0; i < n; i++) {
    const jv_http_header_t *h = &hdrs[i];

    lua_createtable(L, 2, 0);
    lua_pushlstring(L, head + h->name_off, h->name_len);
    lua_rawseti(L, -2, 1);
    lua_pushlstring(L, head + h->value_off, h->value_len);
    lua_rawseti(L, -2, 2);
    lua_rawseti(L, -2, (int) i + 1);
  }
}


int
jv__http_value_ok(const char *v, size_t len)
{
  size_t i;

  for (i = 0; i < len; i++) {
    if (v[i] == '\r' || v[i] == '\n' || v[i] == '\0') {
      return 0;
    }
  }

  return 1;
}


int
jv__http_name_ok(const char *v, size_t len)
{
  size_t i;

  if (len == 0) {
    return 0;
  }

  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char) v[i];

    if (ch <= ' ' || ch >= 0x7f || ch == ':') {
      return 0;
    }
  }

  return 1;
}


int
jv__http_scan_head(char *prev_byte, unsigned *crlf_run, int *scanned,
                   const char *data, size_t len)
{
  size_t i = 0;

  while (i < len && !*scanned) {
    const char *nl = memchr(data + i, '\n', len - i);
    size_t end = nl != NULL ? (size_t) (nl - data) : len;

    if (jv__http_scan_line_bytes(prev_byte, crlf_run, NULL, data + i,
                                 end - i) != 0) {
      return -1;
    }

    if (nl == NULL) {
      break;
    }

    if (*prev_byte != '\r') {
      return -1;
    }

    if (++*crlf_run == 2) {
      *scanned = 1;
    }

    *prev_byte = '\n';
    i = end + 1;
  }

  return 0;
}


int
jv__http_target_ok(const char *s, size_t len)
{
  size_t i;

  if (len == 0) {
    return 0;
  }

  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char) s[i];

    if (ch <= ' ' || ch == 0x7f) {
      return 0;
    }
  }

  return 1;
}


int
jv__http_list_has_token(const char *v, size_t vlen, const char *token,
                        size_t tlen)
{
  size_t i = 0, start, end;

  while (i < vlen) {
    while (i < vlen && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) {
      i++;
    }

    start = i;
    while (i < vlen && v[i] != ',') {
      i++;
    }

    end = i;
    while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t')) {
      end--;
    }

    if (end - start == tlen && strncasecmp(v + start, token, tlen) == 0) {
      return 1;
    }
  }

  return 0;
}


int
jv__http_scan_line_bytes(char *prev_byte, unsigned *crlf_run, int *content,
                         const char *s, size_t n)
{
  size_t k;

  if (n == 0) {
    return 0;
  }

  if (memchr(s, '\0', n) != NULL) {
    /* A NUL byte also counts as the start of a line below, as in the
     * byte-by-byte scan: check every byte. */
    for (k = 0; k < n; k++) {
      char ch = s[k];

      if (ch != '\r') {
        if ((ch == ' ' || ch == '\t') &&
            (*prev_byte == '\n' || *prev_byte == 0)) {
          return -1;
        }
        *crlf_run = 0;
        if (content != NULL) {
          *content = 1;
        }
      }
      *prev_byte = ch;
    }
    return 0;
  }

  /* Without LF or NUL in s, only its first byte can follow a line start. */
  if ((s[0] == ' ' || s[0] == '\t') &&
      (*prev_byte == '\n' || *prev_byte == 0)) {
    return -1;
  }

  for (k = 0; k < n; k++) {
    if (s[k] != '\r') {
      *crlf_run = 0;
      if (content != NULL) {
        *content = 1;
      }
      break;
    }
  }

  *prev_byte = s[n - 1];
  return 0;
}


/* ---- header name lists (core.http.header_names) ---- */

#define JV_HTTP_NAMES_MT "justavps.http_header_names"

/* The metatable's address, for jv__check_udata. */
static const void *names_mt;


jv_http_names_t *
jv__http_to_names(lua_State *L, int idx)
{
  void *p = lua_touserdata(L, idx);
  const void *got;

  if (p == NULL || names_mt == NULL || !lua_getmetatable(L, idx)) {
    return NULL;
  }

  got = lua_topointer(L, -1);
  lua_pop(L, 1);
  return got == names_mt ? p : NULL;
}


int
jv__http_names_find(const jv_http_names_t *names, const char *name, size_t len)
{
  unsigned i;

  for (i = 0; i < names->n; i++) {
    if (names->len[i] == len &&
        strncasecmp(names->bytes + names->off[i], name, len) == 0) {
      return (int) i;
    }
  }

  return -1;
}


/*
 * core.http.header_names(list): an immutable list of header field names,
 * stored in lower case, for req:header_values and the drop_headers of
 * req:forward_head. Made once (at module load), it spares those calls a
 * walk over a Lua table per request. Raises on an invalid or repeated
 * name, or more than JV_HTTP_NAMES_MAX names.
 */
static int
l_header_names(lua_State *L)
{
  jv_http_names_t *names;
  size_t total = 0, len;
  int n, i;

  luaL_checktype(L, 1, LUA_TTABLE);
  n = (int) lua_objlen(L, 1);
  luaL_argcheck(L, n <= JV_HTTP_NAMES_MAX, 1, "too many names");

  for (i = 1; i <= n; i++) {
    const char *name;
    size_t k;

    lua_rawgeti(L, 1, i);
    if (lua_type(L, -1) != LUA_TSTRING) {
      return luaL_error(L, "header_names: entry %d must be a string", i);
    }
    name = lua_tolstring(L, -1, &len);
    if (len == 0 || len > JV_HTTP_NAME_MAX) {
      return luaL_error(L,
                        "header_names: entry %d must be a header name "
                        "of 1 to %d bytes",
                        i, JV_HTTP_NAME_MAX);
    }
    for (k = 0; k < len; k++) {
      unsigned char ch = (unsigned char) name[k];

      if (ch <= ' ' || ch >= 0x7f || ch == ':') {
        return luaL_error(L, "header_names: invalid header name '%s'", name);
      }
    }
    total += len;
    lua_pop(L, 1);
  }

  names = lua_newuserdata(L, sizeof(*names) + total);
  names->n = 0;
  total = 0;

  for (i = 1; i <= n; i++) {
    const char *name;
    size_t k;

    lua_rawgeti(L, 1, i);
    name = lua_tolstring(L, -1, &len);
    if (jv__http_names_find(names, name, len) >= 0) {
      return luaL_error(L, "header_names: '%s' is listed twice", name);
    }
    for (k = 0; k < len; k++) {
      char ch = name[k];

      names->bytes[total + k] =
          (ch >= 'A' && ch <= 'Z') ? (char) (ch + 32) : ch;
    }
    names->off[names->n] = (uint16_t) total;
    names->len[names->n] = (uint16_t) len;
    names->n++;
    total += len;
    lua_pop(L, 1);
  }

  luaL_getmetatable(L, JV_HTTP_NAMES_MT);
  lua_setmetatable(L, -2);
  return 1;
}


static jv_http_names_t *
check_names(lua_State *L)
{
  return jv__check_udata(L, 1, JV_HTTP_NAMES_MT, &names_mt);
}


/* names:has(name): true when name is in the list, compared without case. */
static int
l_names_has(lua_State *L)
{
  jv_http_names_t *names = check_names(L);
  size_t len;
  const char *name = luaL_checklstring(L, 2, &len);

  lua_pushboolean(L, jv__http_names_find(names, name, len) >= 0);
  return 1;
}


/* names:list(): the names in order, in lower case. */
static int
l_names_list(lua_State *L)
{
  jv_http_names_t *names = check_names(L);
  unsigned i;

  lua_createtable(L, (int) names->n, 0);
  for (i = 0; i < names->n; i++) {
    lua_pushlstring(L, names->bytes + names->off[i], names->len[i]);
    lua_rawseti(L, -2, (int) i + 1);
  }

  return 1;
}


void
jv__http_names_register(lua_State *L, int table_index)
{
  static const luaL_Reg methods[] = { { "has", l_names_has },
                                      { "list", l_names_list },
                                      { NULL, NULL } };

  luaL_newmetatable(L, JV_HTTP_NAMES_MT);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  names_mt = lua_topointer(L, -1);
  lua_pop(L, 1);

  lua_pushcfunction(L, l_header_names);
  lua_setfield(L, table_index, "header_names");
}


int
jv__http_head_append(jv_http_head_t *h, const char *at, size_t len,
                     size_t max_size)
{
  size_t need = h->head_len + len;

  if (need > max_size) {
    return JV_ETOOLARGE;
  }

  if (need > h->head_cap) {
    size_t cap = h->head_cap ? h->head_cap * 2 : 1024;
    char *nb;

    while (cap < need) {
      cap *= 2;
    }

    nb = realloc(h->head, cap);
    if (nb == NULL) {
      return JV_ENOMEM;
    }

    h->head = nb;
    h->head_cap = cap;
  }

  memcpy(h->head + h->head_len, at, len);
  h->head_len = need;
  return 0;
}


int
jv__http_head_field(jv_http_head_t *h, const char *at, size_t len,
                    size_t max_size, unsigned max_headers)
{
  jv_http_header_t *f;
  int rc;

  if (h->nhdrs == 0 || h->last_was_value) {
    if (h->nhdrs >= max_headers) {
      return JV_ETOOLARGE;
    }

    if (h->nhdrs == h->hdr_cap) {
      unsigned cap = h->hdr_cap ? h->hdr_cap * 2 : 16;
      jv_http_header_t *nh = realloc(h->hdrs, cap * sizeof(*nh));

      if (nh == NULL) {
        return JV_ENOMEM;
      }

      h->hdrs = nh;
      h->hdr_cap = cap;
    }

    f = &h->hdrs[h->nhdrs++];
    f->name_off = (uint32_t) h->head_len;
    f->name_len = 0;
    f->value_off = (uint32_t) h->head_len;
    f->value_len = 0;
    h->last_was_value = 0;
  }

  f = &h->hdrs[h->nhdrs - 1];
  rc = jv__http_head_append(h, at, len, max_size);
  if (rc != 0) {
    return rc;
  }

  f->name_len += (uint32_t) len;
  f->value_off = (uint32_t) h->head_len;
  return 0;
}


int
jv__http_head_value(jv_http_head_t *h, const char *at, size_t len,
                    size_t max_size)
{
  jv_http_header_t *f = &h->hdrs[h->nhdrs - 1];
  int rc;

  if (!h->last_was_value) {
    f->value_off = (uint32_t) h->head_len;
    h->last_was_value = 1;
  }

  rc = jv__http_head_append(h, at, len, max_size);
  if (rc != 0) {
    return rc;
  }

  f->value_len += (uint32_t) len;
  return 0;
}
