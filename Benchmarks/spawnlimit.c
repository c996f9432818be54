/* The machine's spawn limit: posix_spawn + waitpid of a binary, N times in each of T threads, as fast as it goes.
 * Prints spawns per second. Usage: spawnlimit BINARY N THREADS. (The "≈ 1,500 per core" figure, measured
 * here in the same run and with the same no-op the executors run.) */
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;
static const char *bin;
static long n;

static void *run(void *arg) {
    (void)arg;
    char *argv[] = {(char *)bin, "tasks", "run", "dag", "task", "run_id", NULL};
    for (long i = 0; i < n; i++) {
        pid_t pid;
        int st;
        if (posix_spawn(&pid, bin, NULL, NULL, argv, environ) != 0) { perror("posix_spawn"); exit(1); }
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "spawnlimit: %s did not exit 0\n", bin);
            exit(1);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: spawnlimit BINARY N THREADS\n"); return 2; }
    bin = argv[1];
    n = atol(argv[2]);
    int t = atoi(argv[3]);
    pthread_t th[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < t; i++) pthread_create(&th[i], NULL, run, NULL);
    for (int i = 0; i < t; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f\n", n * t / s);
    return 0;
}
