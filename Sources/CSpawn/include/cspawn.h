#ifndef TANDEM_CSPAWN_H
#define TANDEM_CSPAWN_H
#include <spawn.h>
#include <sys/types.h>

/// Starts `path` (vfork+exec) with `argv` and `envp` in a new process group, with default signal handling, stdin on
/// /dev/null and stdout+stderr appended to `output_path` (inherited when NULL). The child receives
/// `death_signal` when the spawning thread's process dies (PR_SET_PDEATHSIG), so a worker killed with
/// SIGKILL never leaves its tasks running unsupervised. Call from a thread that lives as long as the process:
/// Linux delivers the death signal when the *thread* that forked exits.
/// Returns 0 and sets *pid_out, or an errno value (exec failures included).
int tandem_spawn(const char *path, char *const argv[], char *const envp[], const char *output_path,
                 int death_signal, pid_t *pid_out);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34), which Swift's Glibc module does not show: the child
/// closes every descriptor from `from` up. For the test harness's servers; returns 0 or an errno value.
int tandem_spawn_actions_close_from(posix_spawn_file_actions_t *actions, int from);

/// Runs every thread of this process (and every thread it creates later) on CPU `cpu` alone, while task processes
/// spawned from now on get back the CPUs the process had before — the worker's own threads then hand work to
/// each other on one CPU instead of waking each other across CPUs. Returns 0, or an errno value: EINVAL (nothing
/// changed) when `cpu` is not among the allowed CPUs; otherwise some threads may be pinned and the caller
/// should not go on.
int tandem_pin_threads(int cpu);

/// Names the calling thread for the kernel (/proc, perf, top -H); at most 15 characters are kept.
void tandem_name_thread(const char *name);

/// A pidfd for `pid` (readable once the process has ended), or -1 with errno set.
int tandem_pidfd_open(pid_t pid);

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

/// Marks the calling thread as the worker loop's thread; asks whether the calling thread is it (a thread-local
/// flag: no lookup, so the loop can tell "run it here" from "hand it over" on every spawn).
void tandem_mark_loop_thread(void);
int tandem_on_loop_thread(void);

#endif
