// InteropTests
