/*
 * errors.c: names and messages for the core's error codes, and the helpers
 * that hand an expected failure to Lua as nil, message, code.
 */
#include "internal.h"

#include <openssl/err.h>


const char *
jv_err_name(int code)
{
  switch (code) {
#define XX(name, value, word, message)                                         \
  case value:                                                                  \
    return word;
    JV_ERRNO_MAP(XX)
#undef XX
  case UV_EOF:
    return "closed";
  case UV_ETIMEDOUT:
    return "timeout";
  default:
    return uv_err_name(code);
  }
}


const char *
jv_strerror(int code)
{
  switch (code) {
#define XX(name, value, word, message)                                         \
  case value:                                                                  \
    return message;
    JV_ERRNO_MAP(XX)
#undef XX
  case UV_EOF:
    return "connection closed";
  default:
    return uv_strerror(code);
  }
}


int
jv__push_error(lua_State *L, int code)
{
  lua_pushnil(L);
  lua_pushstring(L, jv_strerror(code));
  lua_pushstring(L, jv_err_name(code));
  return 3;
}


int
jv__push_error_msg(lua_State *L, int code, const char *message)
{
  lua_pushnil(L);
  lua_pushstring(L, message);
  lua_pushstring(L, jv_err_name(code));
  return 3;
}
