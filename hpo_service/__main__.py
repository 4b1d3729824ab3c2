from hpo_service.cli import main

main()
