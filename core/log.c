/*
 * log.c: one logfmt line per event on stderr.
 *
 *   ts=2026-12-04T15:51:12.123Z level=info role=edge msg="listening" port=443
 *
 * A value is quoted when it contains a space, a quote, an equals sign or a
 * control character; quotes, backslashes and control characters inside are
 * escaped, so a line is always one line.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static const char *const level_names[] = { "debug", "info", "warn", "error",
                                           "alert" };

static char log_role[32] = "core";
static jv_log_level_t log_min = JV_LOG_INFO;

/* When stderr is a file or pipe, lines collect in stdio's buffer and a
 * timer flushes it every LOG_FLUSH_MS, so a busy access log costs one
 * write per batch instead of one per request. Errors flush at once. */
#define LOG_FLUSH_MS 100

static int log_buffered;
static uv_timer_t log_timer;


void
jv_log_set_role(const char *role)
{
  snprintf(log_role, sizeof(log_role), "%s", role);
}


void
jv_log_set_level(jv_log_level_t level)
{
  log_min = level;
}


int
jv_log_enabled(jv_log_level_t level)
{
  return level >= log_min;
}


typedef struct {
  char data[8192];
  size_t len;
  int truncated;
} jv_line_t;


static void
line_putc(jv_line_t *line, char c)
{
  if (line->len + 1 < sizeof(line->data)) {
    line->data[line->len++] = c;

  } else {
    line->truncated = 1;
  }
}


static void
line_puts(jv_line_t *line, const char *s)
{
  while (*s) {
    line_putc(line, *s++);
  }
}


static void
line_value(jv_line_t *line, const char *value, size_t len)
{
  static const char hex[] = "0123456789abcdef";
  int quote = (len == 0);
  size_t i;

  for (i = 0; i < len && !quote; i++) {
    unsigned char c = (unsigned char) value[i];
    quote = (c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f);
  }

  if (!quote) {
    for (i = 0; i < len; i++) {
      line_putc(line, value[i]);
    }
    return;
  }

  line_putc(line, '"');

  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char) value[i];

    if (c == '"' || c == '\\') {
      line_putc(line, '\\');
      line_putc(line, (char) c);

    } else if (c == '\n') {
      line_puts(line, "\\n");

    } else if (c == '\t') {
      line_puts(line, "\\t");

    } else if (c < ' ' || c == 0x7f) {
      line_puts(line, "\\x");
      line_putc(line, hex[c >> 4]);
      line_putc(line, hex[c & 15]);

    } else {
      line_putc(line, (char) c);
    }
  }

  line_putc(line, '"');
}


static void
line_begin(jv_line_t *line, jv_log_level_t level)
{
  struct timeval tv;
  struct tm tm;
  char ts[64];

  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
           tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
           tm.tm_sec, (int) (tv.tv_usec / 1000));

  line->len = 0;
  line->truncated = 0;
  line_puts(line, "ts=");
  line_puts(line, ts);
  line_puts(line, " level=");
  line_puts(line, level_names[level]);
  line_puts(line, " role=");
  line_value(line, log_role, strlen(log_role));
}


static void
line_field(jv_line_t *line, const char *key, const char *value, size_t len)
{
  line_putc(line, ' ');
  line_puts(line, key);
  line_putc(line, '=');
  line_value(line, value, len);
}


static void
line_end(jv_line_t *line, jv_log_level_t level)
{
  if (line->truncated) {
    line->len = sizeof(line->data) - 20;
    memcpy(line->data + line->len, " truncated=true", 15);
    line->len += 15;
  }

  line->data[line->len++] = '\n';
  fwrite(line->data, 1, line->len, stderr);

  if (log_buffered && level >= JV_LOG_ERR) {
    fflush(stderr);
  }
}


static void
log_timer_cb(uv_timer_t *timer)
{
  fflush(stderr);
}


void
jv_log_set_buffered(int on)
{
  static char buf[65536];

  if (!on || log_buffered) {
    return;
  }

  fflush(stderr);
  setvbuf(stderr, buf, _IOFBF, sizeof(buf));
  uv_timer_init(jv__loop(), &log_timer);
  uv_timer_start(&log_timer, log_timer_cb, LOG_FLUSH_MS, LOG_FLUSH_MS);
  uv_unref((uv_handle_t *) &log_timer);
  log_buffered = 1;
}


void
jv_log(jv_log_level_t level, const char *msg, ...)
{
  jv_line_t line;
  const char *key;
  va_list ap;

  if (level < log_min) {
    return;
  }

  line_begin(&line, level);
  line_field(&line, "msg", msg, strlen(msg));

  va_start(ap, msg);
  while ((key = va_arg(ap, const char *)) != NULL) {
    const char *value = va_arg(ap, const char *);

    if (value == NULL) {
      value = "";
    }

    line_field(&line, key, value, strlen(value));
  }
  va_end(ap);

  line_end(&line, level);
}


static int
check_level(lua_State *L, int arg)
{
  static const char *const names[] = { "debug", "info",  "warn",
                                       "error", "alert", NULL };

  return luaL_checkoption(L, arg, NULL, names);
}


/*
 * core.log.write(level, msg [, fields]): fields is a table of string keys to
 * scalar values, written in sorted key order so lines are stable.
 */
static int
l_log_write(lua_State *L)
{
  jv_log_level_t level = (jv_log_level_t) check_level(L, 1);
  size_t msg_len;
  const char *msg = luaL_checklstring(L, 2, &msg_len);
  jv_line_t line;
  int nkeys = 0, i;
  const char *keys[64];

  if (level < log_min) {
    return 0;
  }

  line_begin(&line, level);
  line_field(&line, "msg", msg, msg_len);

  if (lua_istable(L, 3)) {
    lua_pushnil(L);
    while (lua_next(L, 3) != 0 && nkeys < (int) JV_ARRAY_SIZE(keys)) {
      if (lua_type(L, -2) == LUA_TSTRING) {
        keys[nkeys++] = lua_tostring(L, -2);
      }
      lua_pop(L, 1);
    }

    /* Insertion sort: field lists are short. */
    for (i = 1; i < nkeys; i++) {
      const char *k = keys[i];
      int j = i - 1;

      while (j >= 0 && strcmp(keys[j], k) > 0) {
        keys[j + 1] = keys[j];
        j--;
      }
      keys[j + 1] = k;
    }

    for (i = 0; i < nkeys; i++) {
      size_t len;
      const char *value;

      lua_getfield(L, 3, keys[i]);
      if (lua_type(L, -1) == LUA_TBOOLEAN) {
        value = lua_toboolean(L, -1) ? "true" : "false";
        len = strlen(value);

      } else {
        value = lua_tolstring(L, -1, &len);
        if (value == NULL) {
          value = luaL_typename(L, -1);
          len = strlen(value);
        }
      }

      line_field(&line, keys[i], value, len);
      lua_settop(L, 3);
    }
  }

  line_end(&line, level);
  return 0;
}


/* core.log.flush(): writes out buffered lines now. */
static int
l_log_flush(lua_State *L)
{
  fflush(stderr);
  return 0;
}


static int
l_log_set_role(lua_State *L)
{
  jv_log_set_role(luaL_checkstring(L, 1));
  return 0;
}


static int
l_log_set_level(lua_State *L)
{
  jv_log_set_level((jv_log_level_t) check_level(L, 1));
  return 0;
}


static int
l_log_enabled(lua_State *L)
{
  lua_pushboolean(L, jv_log_enabled((jv_log_level_t) check_level(L, 1)));
  return 1;
}


int
jv__open_log(lua_State *L)
{
  static const luaL_Reg funcs[] = {
    { "write", l_log_write },         { "set_role", l_log_set_role },
    { "set_level", l_log_set_level }, { "enabled", l_log_enabled },
    { "flush", l_log_flush },         { NULL, NULL }
  };

  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
