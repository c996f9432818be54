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

/// A pidfd for `pid` (readable once the process has ended), or -1 with errno set.
int tandem_pidfd_open(pid_t pid);

#endif
