/*
 * http_headers.c: header fields as Lua tables, for the server's request
 * and the client's response, which both keep them as offsets into a head
 * buffer.
 */
#include "http_internal.h"

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
