#ifndef TANDEM_CHIREDIS_SHIM_H
#define TANDEM_CHIREDIS_SHIM_H
#include <hiredis/hiredis.h>
#include <errno.h>

/* Swift imports `char errstr[128]` as a tuple; these accessors keep the Swift side simple. */
static inline const char *tandem_redis_errstr(const redisContext *c) { return c->errstr; }
static inline int tandem_redis_err(const redisContext *c) { return c->err; }
static inline int tandem_redis_fd(const redisContext *c) { return c->fd; }
static inline int tandem_errno(void) { return errno; }

#endif
