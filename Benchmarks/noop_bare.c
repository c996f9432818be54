/* The bare no-op `airflow` (x86-64 Linux): the same check as noop_airflow.c — `airflow tasks run DAG TASK RUN_ID
 * ...` exits 0, anything else 2 — with no C library at all. A static glibc binary spends most of its short life
 * in start-up code (in a VM, glibc's CPUID cache probes trap to the hypervisor: 14% of all CPU samples of a
 * Tandem benchmark run were that probe), a cost both executors pay per task that is neither executor's work.
 * Built by Benchmarks/run: gcc -O2 -static -nostdlib -fno-stack-protector. */
__attribute__((noreturn)) static void sys_exit(long code) {
    __asm__ volatile("syscall" : : "a"(60L), "D"(code) : "rcx", "r11", "memory");
    __builtin_unreachable();
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

/* called from _start with the initial stack: argc, then argv[] */
__attribute__((noreturn, used)) void noop_main(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    sys_exit(argc >= 6 && same(argv[1], "tasks") && same(argv[2], "run") ? 0 : 2);
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall noop_main\n");
