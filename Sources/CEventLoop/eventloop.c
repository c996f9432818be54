// The system calls an event-loop thread makes (EventLoopThread in ClientSupport), for what Swift's Glibc module
// cannot express: epoll's packed event struct, a thread-local and the thread's kernel name.
#define _GNU_SOURCE
#include "ceventloop.h"
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

int tandem_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int tandem_epoll_add(int epfd, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

int tandem_epoll_del(int epfd, int fd) { return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL); }

int tandem_epoll_want_write(int epfd, int fd, int on) {
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = fd};
    return epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
}

int tandem_epoll_wait(int epfd, int *fds, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    for (int i = 0; i < n; i++) fds[i] = evs[i].data.fd;
    return n;
}

int tandem_eventfd_create(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

void tandem_eventfd_signal(int fd) {
    uint64_t one = 1;
    (void)!write(fd, &one, sizeof one);
}

void tandem_eventfd_drain(int fd) {
    uint64_t n;
    (void)!read(fd, &n, sizeof n);
}

static __thread const void *current_loop = 0;
void tandem_set_current_loop(const void *loop) { current_loop = loop; }
const void *tandem_current_loop(void) { return current_loop; }

void tandem_name_thread(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }
