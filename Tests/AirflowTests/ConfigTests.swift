import AirflowConfig
import Testing

@Suite("airflow.cfg")
struct AirflowConfigTests {
    static let cfg = """
        [core]
        execution_api_server_url = http://api:8080/execution/
        # a comment
        [celery]
        broker_url = redis://file:6379/0
        result_backend = db+postgresql://u:p@db/airflow
        worker_concurrency = 8
        [celery_broker_transport_options]
        master_name = mymaster
        visibility_timeout = 21600
        [logging]
        base_log_folder = /var/log/airflow
        [api]
        secret_key = s3cret
        [webserver]
        secret_key = old
        """

    @Test func fileValues() {
        let c = AirflowConfig.parse(Self.cfg)
        #expect(c.brokerURL == "redis://file:6379/0")
        #expect(c.resultBackend == "db+postgresql://u:p@db/airflow")
        #expect(c.workerConcurrency == 8)
        #expect(c.masterName == "mymaster")
        #expect(c.visibilityTimeout == 21600)
        #expect(c.baseLogFolder == "/var/log/airflow")
        #expect(c.secretKey == "s3cret")
        #expect(c.executionAPIServerURL == "http://api:8080/execution/")
    }

    @Test func environmentWins() {
        var c = AirflowConfig.parse(Self.cfg)
        c.environment = ["AIRFLOW__CELERY__BROKER_URL": "redis://env:6379/1", "AIRFLOW__CELERY__WORKER_CONCURRENCY": "3"]
        #expect(c.brokerURL == "redis://env:6379/1")
        #expect(c.workerConcurrency == 3)
        #expect(c.masterName == "mymaster")
    }

    @Test func fallbacks() {
        let c = AirflowConfig.parse("""
            [database]
            sql_alchemy_conn = postgresql+psycopg2://a@b/c
            [webserver]
            secret_key = airflow2
            [api]
            base_url = http://host:9090
            """)
        #expect(c.resultBackend == "db+postgresql+psycopg2://a@b/c")
        #expect(c.secretKey == "airflow2")
        #expect(c.executionAPIServerURL == "http://host:9090/execution/")
    }
}
