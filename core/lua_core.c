/*
 * lua_core.c: builds the table that require("justavps.core") returns.
 *
 * The executable registers luaopen_justavps_core in package.preload; the
 * same objects built as lua/justavps/core.so let plain luajit (and busted)
 * load the core as a C module.
 */
#include "internal.h"
#include "ws_pipe.h"

#include <signal.h>

typedef struct {
  const char *name; /* field in the core table, or NULL for core.* */
  int (*open)(lua_State *L);
} jv_module_t;

static const jv_module_t modules[] = {
  { NULL, jv__open_loop },       { "log", jv__open_log },
  { "crypto", jv__open_crypto }, { "nonce", jv__open_nonce },
  { "tcp", jv__open_tcp },       { "tls", jv__open_tls },
  { "http", jv__open_http },     { "ws", jv__open_ws },
  { "proc", jv__open_proc },     { "pty", jv__open_pty },
  { "signal", jv__open_signal }, { "fs", jv__open_fs },
  { "pipe", jv__open_pipe },     { "pg", jv__open_pg },
  { "curl", jv__open_curl },
};

int luaopen_justavps_core(lua_State *L);


int
luaopen_justavps_core(lua_State *L)
{
  size_t i;

  /* A peer that closes mid-write must produce EPIPE, not kill us. */
  signal(SIGPIPE, SIG_IGN);

  lua_newtable(L);

  for (i = 0; i < JV_ARRAY_SIZE(modules); i++) {
    modules[i].open(L);

    if (modules[i].name == NULL) {
      /* Copy core.* functions into the core table itself. */
      lua_pushnil(L);
      while (lua_next(L, -2) != 0) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_settable(L, -5);
      }
      lua_pop(L, 1);

    } else {
      lua_setfield(L, -2, modules[i].name);
    }
  }

  lua_pushstring(L, JV_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
