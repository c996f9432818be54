/* The floor under any executor fed by Celery's client: take the message off kombu's Redis list (BRPOP, as a Celery
 * worker does), posix_spawn the no-op `airflow`, wait for it — and nothing else: no dispatcher hop, no lease, no
 * result, no ack, no parsing. Whatever an executor adds (Tandem's or Celery's) comes on top of this, so a target
 * below this floor cannot be met by any executor on this machine and publish path.
 *
 *   floor HOST PORT LIST BINARY --times N     one consumer: after each of N messages, prints the wall-clock time
 *                                             (CLOCK_REALTIME, "sec.nsec") at which its process had been reaped
 *   floor HOST PORT LIST BINARY --rate T      T consumers, each on its own connection, until LIST is empty
 *                                             (preloaded); prints messages per second
 *
 * Built by Benchmarks/run (gcc -O2 floor.c -lhiredis -pthread). */
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
extern char **environ;

static const char *host, *list, *bin;
static int port;
static long done_total;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;

static redisContext *connect_or_die(void) {
    redisContext *c = redisConnect(host, port);
    if (c == NULL || c->err) {
        fprintf(stderr, "floor: cannot connect to Redis at %s:%d: %s — is it running?\n", host, port,
                c ? c->errstr : "out of memory");
        exit(1);
    }
    return c;
}

/* Runs the no-op as a task would be run; exits the program if it does not exit 0. */
static void run_task(void) {
    char *argv[] = {(char *)bin, "tasks", "run", "dag", "task", "run_id", NULL};
    pid_t pid;
    int st;
    if (posix_spawn(&pid, bin, NULL, NULL, argv, environ) != 0) { perror("floor: posix_spawn"); exit(1); }
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "floor: %s did not exit 0\n", bin);
        exit(1);
    }
}

static void *drain(void *arg) {
    (void)arg;
    redisContext *c = connect_or_die();
    long mine = 0;
    for (;;) {
        redisReply *r = redisCommand(c, "RPOP %s", list);
        if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); exit(1); }
        int empty = r->type == REDIS_REPLY_NIL;
        freeReplyObject(r);
        if (empty) break;
        run_task();
        mine++;
    }
    pthread_mutex_lock(&count_lock);
    done_total += mine;
    pthread_mutex_unlock(&count_lock);
    redisFree(c);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7 || (strcmp(argv[5], "--times") != 0 && strcmp(argv[5], "--rate") != 0)) {
        fprintf(stderr, "usage: floor HOST PORT LIST BINARY --times N | --rate THREADS\n");
        return 2;
    }
    host = argv[1];
    port = atoi(argv[2]);
    list = argv[3];
    bin = argv[4];
    long n = atol(argv[6]);
    if (strcmp(argv[5], "--times") == 0) {
        redisContext *c = connect_or_die();
        setvbuf(stdout, NULL, _IOLBF, 0);
        for (long i = 0; i < n; i++) {
            redisReply *r = redisCommand(c, "BRPOP %s 30", list);
            if (r == NULL) { fprintf(stderr, "floor: Redis connection lost: %s\n", c->errstr); return 1; }
            if (r->type != REDIS_REPLY_ARRAY) {
                fprintf(stderr, "floor: no message on %s for 30 s after %ld of %ld\n", list, i, n);
                return 1;
            }
            freeReplyObject(r);
            run_task();
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            printf("%ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);
        }
        redisFree(c);
        return 0;
    }
    int threads = (int)n;
    if (threads < 1 || threads > 64) { fprintf(stderr, "floor: THREADS must be 1..64\n"); return 2; }
    pthread_t th[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, drain, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("%.1f %ld\n", done_total / s, done_total);
    return 0;
}
