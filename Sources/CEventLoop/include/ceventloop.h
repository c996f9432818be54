#ifndef TANDEM_CEVENTLOOP_H
#define TANDEM_CEVENTLOOP_H

/// epoll without its packed struct (Swift cannot lay it out): create, watch `fd` for readability, forget `fd`,
/// and wait for up to `max` ready fds (stored in `fds`; returns how many, or -1 on EINTR/error).
int tandem_epoll_create(void);
int tandem_epoll_add(int epfd, int fd);
int tandem_epoll_del(int epfd, int fd);
/// Watch an added `fd` for writability too (`on` = 1), or for readability alone again (0).
int tandem_epoll_want_write(int epfd, int fd, int on);
/// `timeout_ms` as epoll_wait's: -1 waits until an fd is ready, 0 only looks.
int tandem_epoll_wait(int epfd, int *fds, int max, int timeout_ms);

/// An eventfd (non-blocking, close-on-exec) that wakes an epoll loop from another thread; -1 with errno set.
int tandem_eventfd_create(void);
/// Makes `fd` readable (adds 1 to its counter) / makes it unreadable again (reads the counter).
void tandem_eventfd_signal(int fd);
void tandem_eventfd_drain(int fd);

/// Records which loop the calling thread runs (`loop` is that loop's identity; NULL for none); asks which loop
/// the calling thread runs. A thread-local: no lookup, so a loop can tell "run it here" from "hand it over" on
/// every call.
void tandem_set_current_loop(const void *loop);
const void *tandem_current_loop(void);

/// Names the calling thread for the kernel (/proc, perf, top -H); at most 15 characters are kept.
void tandem_name_thread(const char *name);

#endif
