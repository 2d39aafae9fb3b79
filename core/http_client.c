/* http_client.c: placeholder until the HTTP client lands. */
#include "http_internal.h"


void
jv__http_client_register(lua_State *L, int table_index)
{
  (void) L;
  (void) table_index;
}
