from erp_pipelines.cli import main

raise SystemExit(main())
