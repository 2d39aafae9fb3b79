/* nonce.c: placeholder until the module lands. */
#include "internal.h"


int
jv__open_nonce(lua_State *L)
{
  lua_newtable(L);
  return 1;
}
