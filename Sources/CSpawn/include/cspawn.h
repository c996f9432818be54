#ifndef TANDEM_CSPAWN_H
#define TANDEM_CSPAWN_H
#include <sys/types.h>

/// Starts `path` (vfork+exec) with `argv` and `envp` in a new process group, with default signal handling, stdin on
/// /dev/null and stdout+stderr appended to `output_path` (inherited when NULL). The child receives
/// `death_signal` when the spawning thread's process dies (PR_SET_PDEATHSIG), so a worker killed with
/// SIGKILL never leaves its tasks running unsupervised. Call from a thread that lives as long as the process:
/// Linux delivers the death signal when the *thread* that forked exits.
/// Returns 0 and sets *pid_out, or an errno value (exec failures included).
int tandem_spawn(const char *path, char *const argv[], char *const envp[], const char *output_path,
                 int death_signal, pid_t *pid_out);

#endif
