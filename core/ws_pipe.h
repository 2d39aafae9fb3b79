/*
 * ws_pipe.h: the socket-to-socket byte pipe (pipe.c), shared with ws.c,
 * which registers it as core.ws.pipe.
 */
#ifndef JV_WS_PIPE_H
#define JV_WS_PIPE_H

#include <lua.h>

/* Pushes the Lua function pipe(a, b [, opts]); see pipe.c. */
int jv__open_pipe(lua_State *L);

#endif /* JV_WS_PIPE_H */
