from stream_ser.cli import main

raise SystemExit(main())
