// CeleryWireTests
