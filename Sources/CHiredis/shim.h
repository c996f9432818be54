#ifndef TANDEM_CHIREDIS_SHIM_H
#define TANDEM_CHIREDIS_SHIM_H
#include <hiredis/hiredis.h>
#include <errno.h>
#include <fcntl.h>

/* Swift imports `char errstr[128]` as a tuple; these accessors keep the Swift side simple. */
static inline const char *tandem_redis_errstr(const redisContext *c) { return c->errstr; }
static inline int tandem_redis_err(const redisContext *c) { return c->err; }
static inline int tandem_redis_fd(const redisContext *c) { return c->fd; }
static inline int tandem_errno(void) { return errno; }

/* Turns a connected context into a non-blocking one (for a connection an event loop drives): the socket gets
   O_NONBLOCK and hiredis stops treating EAGAIN as an error. Returns -1 (errno set) when fcntl fails. */
static inline int tandem_redis_make_nonblocking(redisContext *c) {
    int flags = fcntl(c->fd, F_GETFL);
    if (flags == -1 || fcntl(c->fd, F_SETFL, flags | O_NONBLOCK) == -1) return -1;
    c->flags &= ~REDIS_BLOCK;
    return 0;
}

#endif
