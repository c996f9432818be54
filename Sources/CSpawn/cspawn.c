// vfork+exec with the three things posix_spawn cannot do together on Linux: PR_SET_PDEATHSIG, a fresh process
// group and an exec-failure report. vfork shares the worker's memory until exec instead of copying its page
// tables (fork was a quarter of the worker's CPU in the benchmark), so the child only makes async-signal-safe
// system calls, touches no heap and runs with every signal blocked until just before execve; the spawning
// thread is suspended meanwhile.
#define _GNU_SOURCE
#include "cspawn.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <dirent.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

// the CPUs task processes run on, restored in the child before exec once the worker pinned its own threads
static cpu_set_t child_cpus;
static volatile int child_cpus_set = 0;

int tandem_pin_threads(int cpu) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return errno;
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed)) return EINVAL;
    child_cpus = allowed;
    child_cpus_set = 1;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    // every thread that exists now; threads created later inherit their creator's affinity
    DIR *d = opendir("/proc/self/task");
    if (d == NULL) return errno;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        pid_t tid = (pid_t)atoi(e->d_name);
        if (sched_setaffinity(tid, sizeof one, &one) != 0 && errno != ESRCH) rc = errno;
    }
    closedir(d);
    return rc;
}

int tandem_spawn(const char *path, char *const argv[], char *const envp[], const char *output_path,
                 int death_signal, pid_t *pid_out) {
    // the child reports a failed exec here: under vfork it shares this memory and the parent resumes only once
    // it has exec'd or exited, so the value is final by then (glibc's posix_spawn reports the same way; a pipe
    // cost three system calls per spawn)
    volatile int child_err = 0;
    pid_t parent = getpid();
    sigset_t all, old;
    sigfillset(&all);
    // block signals so no handler of the worker runs in the child before exec — except SIGCHLD while it has no
    // handler: blocked, an earlier task's exit during this call is queued and wakes the thread that takes the
    // process's signals; unblocked, the kernel discards it as it is sent (the reaper watches pidfds instead)
    struct sigaction chld;
    if (sigaction(SIGCHLD, NULL, &chld) == 0 && !(chld.sa_flags & SA_SIGINFO) && chld.sa_handler == SIG_DFL)
        sigdelset(&all, SIGCHLD);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = vfork();
    if (pid == 0) {
        int err;
        // the child has its own signal dispositions (no CLONE_SIGHAND): reset them so no worker handler can run
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (int s = 1; s < NSIG; s++) {
            if (s == SIGKILL || s == SIGSTOP) continue;
            sigaction(s, &dfl, NULL);
        }
        setpgid(0, 0);
        if (death_signal > 0) {
            prctl(PR_SET_PDEATHSIG, death_signal);
            if (getppid() != parent) _exit(127);  // the worker died before prctl took effect
        }
        if (child_cpus_set) sched_setaffinity(0, sizeof child_cpus, &child_cpus);
        int in = open("/dev/null", O_RDONLY);
        if (in >= 0 && in != 0) { dup2(in, 0); close(in); }
        if (output_path != NULL) {
            int out = open(output_path, O_WRONLY | O_CREAT | O_APPEND, 0600);
            if (out < 0) goto fail;
            dup2(out, 1);
            dup2(out, 2);
            if (out > 2) close(out);
        }
        // nothing but stdin/out/err reaches the task: without this every task process held the worker's Redis
        // sockets and its HTTP listener (hiredis opens sockets without close-on-exec), so a long task kept the
        // worker's port bound after the worker died. Marked close-on-exec: one system call for all of them.
        if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
            struct rlimit lim;
            int top = getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < 65536 ? (int)lim.rlim_cur : 65536;
            for (int fd = 3; fd < top; fd++) fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(path, argv, envp);
    fail:
        err = errno;
        child_err = err != 0 ? err : EINVAL;
        _exit(127);
    }
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) return saved;
    if (child_err != 0) {
        int st;
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {}
        return child_err;
    }
    *pid_out = pid;
    return 0;
}

int tandem_spawn_actions_close_from(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

int tandem_pidfd_open(pid_t pid) {
    return (int)syscall(SYS_pidfd_open, pid, 0);
}
