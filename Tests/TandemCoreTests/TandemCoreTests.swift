// TandemCoreTests
